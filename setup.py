"""Build of the compiled kernels (``lbgw._fastpick``); metadata lives in pyproject.toml.

Build knobs, read here and nowhere else:

* ``LBGW_CYTHON_ANNOTATE=1`` writes ``lbgw/_fastpick.html`` (``cython -a``), to
  check that the pick loops touch no Python object.
* ``LBGW_CYTHON_DEBUG=1`` compiles with ``-O0 -g`` and Cython's bounds and
  wraparound checks on, for gdb and for chasing memory errors.

A compiler failure fails the install: there is no silent pure-Python
fallback at build time (``LBGW_NO_EXTENSIONS=1`` chooses it at run time).

The build also generates Python code for the ``.proto`` files under
``protos/lbgw/pb`` with grpcio-tools, into ``lbgw/pb/`` (messages, type stubs
and gRPC stubs). Generated files are build outputs: never edited, never
committed. A ``protoc`` error fails the install too.
"""

import os
from pathlib import Path

from Cython.Build import cythonize
from grpc_tools import protoc  # a build requirement (pyproject.toml)
from setuptools import Extension, setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


debug = _flag("LBGW_CYTHON_DEBUG")
annotate = _flag("LBGW_CYTHON_ANNOTATE")

# GCC or Clang (the kernels use unsigned __int128). The floating point must
# match the Python twins bit for bit: no fused multiply-add contraction.
# Loops start on 32-byte boundaries: where a hot loop lands otherwise depends on
# the code before it, and SWRR's scan at 16 backends took 14.4 ns instead of
# 11.4 when new code moved it across a 64-byte line (bench/pick.py, C loop).
compile_args = ["-O0", "-g"] if debug else ["-O3"]
compile_args += ["-ffp-contract=off", "-falign-loops=32"]

directives = {"language_level": "3", "embedsignature": True}
if debug:
    directives.update({"boundscheck": True, "wraparound": True})

extensions = [
    Extension("lbgw._fastpick", ["lbgw/_fastpick.pyx"], extra_compile_args=compile_args),
]


def generate_protos() -> None:
    root = Path(__file__).resolve().parent
    protos = root / "protos"
    sources = sorted(str(p.relative_to(protos)) for p in (protos / "lbgw" / "pb").rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"  # well-known types
    args = [
        "grpc_tools.protoc",
        f"-I{protos}",
        f"-I{include}",
        f"--python_out={root}",
        f"--pyi_out={root}",
        f"--grpc_python_out={root}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {', '.join(sources)}")


generate_protos()

setup(ext_modules=cythonize(extensions, annotate=annotate, compiler_directives=directives))
