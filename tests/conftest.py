"""Shared test set-up: the hypothesis profile and the ``impl`` fixture.

Every kernel test takes ``impl`` and so runs twice, on the pure-Python twins
(``lbgw.picking``, id ``python``) and on the compiled kernels
(``lbgw._fastpick``, id ``cython``), as yarl's tests do for its quoters.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from types import ModuleType

import pytest
from hypothesis import settings

from lbgw import _fastpick, loops, picking

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


#: Test modules that run on every event loop lbgw supports (``[server] event_loop``).
_EVERY_LOOP = frozenset({"tests.integration.test_interop"})


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The interop suite runs on asyncio's loop and on uvloop; every other test on asyncio's."""
    module = getattr(item, "module", None)
    if module is None or module.__name__ not in _EVERY_LOOP:
        return {"asyncio": asyncio.new_event_loop}
    return {"asyncio": asyncio.new_event_loop, "uvloop": loops.loop_factory("uvloop")}
