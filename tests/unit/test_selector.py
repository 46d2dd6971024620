"""``lbgw.kernels`` runs the compiled kernels unless ``LBGW_NO_EXTENSIONS`` forces the twins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import lbgw
from lbgw import _fastpick, kernels, picking
from tests.unit.kernel_support import CLASS_NAMES

PROBE = (
    "import lbgw, lbgw.kernels as k; "
    "print(k.IMPLEMENTATION, lbgw.IMPLEMENTATION, "
    "k.SmoothWeightedRoundRobin.__module__, lbgw.PeakEwma.__module__)"
)


#: ``LBGW_NO_EXTENSIONS`` -> the kernels it selects, as ``lbgw.kernels`` documents it:
#: any value but unset, empty or ``0`` forces the twins. Written out, not computed,
#: so that the selector is checked against the documented cases, not against a copy of
#: its own rule.
SELECTS: dict[str | None, str] = {
    None: "cython",
    "": "cython",
    "0": "cython",
    "1": "python",
    "yes": "python",
    "false": "python",
}


def run_python(code: str, env_value: str | None, cwd: Path) -> str:
    env = dict(os.environ)
    env.pop("LBGW_NO_EXTENSIONS", None)
    if env_value is not None:
        env["LBGW_NO_EXTENSIONS"] = env_value
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def test_this_process_runs_the_selected_kernels() -> None:
    value = os.environ.get("LBGW_NO_EXTENSIONS")
    if value not in SELECTS:
        pytest.skip(f"LBGW_NO_EXTENSIONS={value!r} is not one of the documented cases")
    name = SELECTS[value]
    expected: ModuleType = picking if name == "python" else _fastpick
    assert kernels.IMPLEMENTATION == lbgw.IMPLEMENTATION == name
    for cls in CLASS_NAMES:
        assert getattr(kernels, cls) is getattr(expected, cls)
        assert getattr(lbgw, cls) is getattr(expected, cls)
    assert kernels.hash64 is lbgw.hash64 is expected.hash64
    assert (kernels.MAX_WEIGHT, kernels.EDF_THRESHOLD) == (
        expected.MAX_WEIGHT,
        expected.EDF_THRESHOLD,
    )


@pytest.mark.parametrize(("env_value", "implementation"), SELECTS.items())
def test_lbgw_no_extensions_selects_the_twins(
    env_value: str | None, implementation: str, tmp_path: Path
) -> None:
    module = "lbgw.picking" if implementation == "python" else "lbgw._fastpick"
    expected = f"{implementation} {implementation} {module} {module}"
    assert run_python(PROBE, env_value, tmp_path) == expected


def test_missing_extension_falls_back_to_the_twins_with_a_warning(tmp_path: Path) -> None:
    code = (
        "import sys, warnings\n"
        "sys.modules['lbgw._fastpick'] = None  # as if never built\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import lbgw.kernels as k\n"
        "print(k.IMPLEMENTATION, k.Random.__module__)\n"
        "print([(w.category.__name__, 'not built' in str(w.message)) for w in caught])\n"
    )
    out = run_python(code, None, tmp_path).splitlines()
    assert out == ["python lbgw.picking", "[('RuntimeWarning', True)]"]
