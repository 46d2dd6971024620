"""Shared test set-up: the hypothesis profile and the ``impl`` fixture.

Every kernel test takes ``impl`` and so runs twice, on the pure-Python twins
(``lbgw.picking``, id ``python``) and on the compiled kernels
(``lbgw._fastpick``, id ``cython``), as yarl's tests do for its quoters.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest
from hypothesis import settings

from lbgw import _fastpick, picking

# Deterministic and bounded: the same examples on every run, no example
# database, and few enough that the kernel suite stays in seconds on 2 cores.
# HYPOTHESIS_PROFILE=dev selects a longer, randomized search for local digging.
settings.register_profile("ci", deadline=None, max_examples=100, derandomize=True, database=None)
settings.register_profile("dev", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", params=[picking, _fastpick], ids=["python", "cython"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """The kernel module under test: the pure-Python twins or the compiled kernels."""
    module: ModuleType = request.param
    return module
