"""The pick loops touch no Python object, as ``cython -a`` reports it.

Cython's annotation scores every source line by how much it calls into the
Python C-API; 0 means plain C. This test annotates ``_fastpick.pyx`` afresh
and requires a score of 0 for every line of every ``nogil`` function (the
pick bodies, the retries' ``*_excluding`` picks, the heaps, the random draws)
and of every ``with nogil`` block (the ``pick_many`` loops). A signature may
run over several lines.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lbgw

SOURCE = Path(lbgw.__file__).with_name("_fastpick.pyx")
_LINE = re.compile(
    r'<pre class="cython line score-(\d+)"[^>]*>.*?<span class="">(\d+)</span>:', re.S
)
_NOGIL_DEF = re.compile(r"^(\s*)cdef .*\bnogil\s*:\s*$")
_OPEN_DEF = re.compile(r"^(\s*)cdef .*\($")  # a signature continued on the next lines
_WITH_NOGIL = re.compile(r"^(\s*)with nogil\s*:\s*$")
_NAME = re.compile(r"(\w+)\(")
#: nogil functions the test must find: the retries' picks, which are easy to miss.
EXPECTED = {
    "_two_excluding",
    "_dense_pos",
    "_rotates",
    "_pick_excluding",
    "_pick_p2c_excluding",
    "_lookup_excluding",
    "_walk_excluding",
}


def _hot_lines(source: list[str]) -> dict[int, str]:
    """Line number -> name of the nogil function or block it belongs to."""
    hot: dict[int, str] = {}
    block: tuple[int, str] | None = None  # (indent of the header, name)
    opened: tuple[int, int, str] | None = None  # a multi-line signature: indent, line, text
    for number, line in enumerate(source, start=1):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if opened is not None:
            text = f"{opened[2]} {stripped}"
            if stripped.endswith(":"):
                if _NOGIL_DEF.match(text):
                    block = (opened[0], f"line {opened[1]}: {text}")
                opened = None
            else:
                opened = (opened[0], opened[1], text)
            continue
        if block is not None and stripped and indent <= block[0]:
            block = None
        if block is not None and stripped:
            hot[number] = block[1]
            continue
        header = _NOGIL_DEF.match(line) or _WITH_NOGIL.match(line)
        if header:
            block = (len(header.group(1)), f"line {number}: {stripped}")
        elif start := _OPEN_DEF.match(line):
            opened = (len(start.group(1)), number, stripped)
    return hot


def test_multi_line_signatures_count() -> None:
    source = [
        "cdef inline void f(",
        "    int a, int b",
        ") noexcept nogil:",
        "    a += b",
        "cdef object g(",
        "    int a",
        "):",
        "    return a",
    ]
    assert _hot_lines(source) == {4: "line 1: cdef inline void f( int a, int b ) noexcept nogil:"}


def _scores(html: str) -> dict[int, int]:
    return {int(number): int(score) for score, number in _LINE.findall(html)}


def test_hot_loops_have_no_python_interaction(tmp_path: Path) -> None:
    if shutil.which("cython") is None and not (Path(sys.executable).parent / "cython").exists():
        pytest.skip("cython is not installed")  # pragma: no cover - it is in the test extras
    for name in ("_fastpick.pyx", "_fastpick.pxd"):
        shutil.copy(SOURCE.with_name(name), tmp_path / name)
    subprocess.run(
        [sys.executable, "-m", "cython", "-3", "-a", "_fastpick.pyx"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    source = (tmp_path / "_fastpick.pyx").read_text().splitlines()
    hot = _hot_lines(source)
    scores = _scores((tmp_path / "_fastpick.html").read_text())
    assert len(hot) > 100, "the nogil functions were not found: has the annotation format changed?"
    found = {m.group(1) for where in hot.values() if (m := _NAME.search(where.split(": ", 1)[1]))}
    assert found >= EXPECTED, EXPECTED - found
    assert set(hot) <= set(scores), "the annotation lost lines: has its format changed?"
    offending = [
        f"{number}: score {scores[number]} in {where}: {source[number - 1].strip()}"
        for number, where in sorted(hot.items())
        if scores[number] > 0
    ]
    assert offending == []
