"""Build hook: compile the page-store hot path with mypyc (pure Python if unavailable).

zcache's put/get paths run once per page; compiled with mypyc (the mypy project's
compiler for type-annotated Python) they cost a fraction of interpreted bytecode. The
same sources run unchanged as pure Python: set TMEM_PURE_PYTHON=1 to skip compiling.

Where liblz4's header is installed (Debian: liblz4-dev), the small C extension
tmem._lz4pages is built too: an LZ4 page codec without python-lz4's extra copies
(see src/tmem/_lz4pages.c); without it tmem uses python-lz4, same format.
Everything else about the package lives in pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

from setuptools import Extension, setup

COMPILED = [
    "src/tmem/tmem_core.py",
    "src/tmem/zbud.py",
    "src/tmem/zcache.py",
    "src/tmem/nbd/protocol.py",
    "src/tmem/nbd/blockdev.py",
    "src/tmem/nbd/server.py",
    "src/tmem/ramster/export.py",
    "src/tmem/ramster/wire.py",
    "src/tmem/ramster/fastpath.py",
]


def can_compile() -> bool:
    """A C compiler and Python's headers are present (else: install pure Python)."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return shutil.which(compiler) is not None and headers.exists()


def has_lz4_header() -> bool:
    dirs = [sysconfig.get_paths()["include"], "/usr/include", "/usr/local/include"]
    return any((Path(d) / "lz4.h").exists() for d in dirs)


ext_modules = []
compiling = not os.environ.get("TMEM_PURE_PYTHON") and can_compile()
if compiling and has_lz4_header():
    ext_modules.append(
        Extension(
            "tmem._lz4pages",
            ["src/tmem/_lz4pages.c"],
            libraries=["lz4"],
            extra_compile_args=["-O2"],
        )
    )
if compiling:
    try:
        from mypyc.build import mypycify
    except ImportError:  # pragma: no cover - build without mypy: pure Python
        pass
    else:
        # Type-check only what is compiled, against the build requirements alone: the
        # modules it imports but does not compile (aio, httpstats) may use runtime
        # dependencies (uvloop, prometheus-client) that pip's isolated build lacks.
        build_flags = ["--follow-imports=silent", "--ignore-missing-imports"]
        ext_modules += mypycify(build_flags + COMPILED, opt_level="3")

setup(ext_modules=ext_modules)
