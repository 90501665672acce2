"""Build hook: compile the page-store hot path with mypyc (pure Python if unavailable).

zcache's put/get paths run once per page; compiled with mypyc (the mypy project's
compiler for type-annotated Python) they cost a fraction of interpreted bytecode. The
same sources run unchanged as pure Python: set TMEM_PURE_PYTHON=1 to skip compiling.

Where liblz4's header is installed (Debian: liblz4-dev), the small C extension
tmem._lz4pages is built too: an LZ4 page codec without python-lz4's extra copies
(see src/tmem/_lz4pages.c); without it tmem uses python-lz4, same format.

Compiling is an optimisation, never a requirement: with no C compiler, no Python
headers, no liblz4 header, or a compile that fails, the install goes on as pure Python
and says so in one line on stderr (``pip install -v`` shows it).
Everything else about the package lives in pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

COMPILED = [
    "src/tmem/tmem_core.py",
    "src/tmem/pagetable.py",
    "src/tmem/arena.py",
    "src/tmem/zsmalloc.py",
    "src/tmem/zbud.py",
    "src/tmem/zcache.py",
    "src/tmem/nbd/protocol.py",
    "src/tmem/nbd/blockdev.py",
    "src/tmem/nbd/server.py",
    "src/tmem/ramster/export.py",
    "src/tmem/ramster/wire.py",
    "src/tmem/ramster/fastpath.py",
]
LZ4_EXTENSION = "tmem._lz4pages"


def notice(message: str) -> None:
    print(f"tmem: {message}", file=sys.stderr)


def missing_build_tools() -> str | None:
    """Why nothing can be compiled here, or None when a compiler and headers exist."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler})"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "no Python headers (Debian: python3-dev)"
    return None


def has_lz4_header() -> bool:
    dirs = [sysconfig.get_paths()["include"], "/usr/include", "/usr/local/include"]
    return any((Path(d) / "lz4.h").exists() for d in dirs)


def mypyc_extensions() -> list[Extension]:
    try:
        from mypyc.build import mypycify
    except ImportError:  # pragma: no cover - a build without its build requirements
        notice("mypyc is not importable; installing pure Python")
        return []
    # Type-check only what is compiled, against the build requirements alone: the
    # modules it imports but does not compile (aio, httpstats) may use runtime
    # dependencies (uvloop, prometheus-client) that pip's isolated build lacks.
    build_flags = ["--follow-imports=silent", "--ignore-missing-imports"]
    try:
        return list(mypycify(build_flags + COMPILED, opt_level="3"))
    except SystemExit as exc:  # mypyc reports type errors by exiting
        notice(f"mypyc could not compile ({exc}); installing pure Python")
        return []


class OptionalBuildExt(build_ext):
    """Builds the extensions, falling back to pure Python when a compile fails."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name != LZ4_EXTENSION:
            super().build_extension(ext)
            return
        try:
            super().build_extension(ext)
        except Exception as exc:  # any compiler failure: use python-lz4
            notice(f"{LZ4_EXTENSION} did not compile ({exc}); using python-lz4")
            self._remove_output(ext)

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # any compiler failure: pure Python
            notice(f"compiling failed ({exc}); installing pure Python")
            for ext in self.extensions:
                self._remove_output(ext)

    def _remove_output(self, ext: Extension) -> None:
        Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)


# Only a build compiles: pip also runs this file for metadata and the sdist, where
# mypyc's type check and C generation would be a minute of work thrown away.
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}
ext_modules: list[Extension] = []
if not BUILD_COMMANDS.intersection(sys.argv[1:]):
    pass
elif os.environ.get("TMEM_PURE_PYTHON"):
    notice("TMEM_PURE_PYTHON is set; installing pure Python")
elif (why := missing_build_tools()) is not None:
    notice(f"{why}; installing pure Python (slower, same behaviour)")
else:
    if has_lz4_header():
        ext_modules.append(
            Extension(
                LZ4_EXTENSION,
                ["src/tmem/_lz4pages.c"],
                libraries=["lz4"],
                extra_compile_args=["-O2"],
            )
        )
    else:
        notice("no lz4.h (Debian: liblz4-dev); using python-lz4 for the page codec")
    ext_modules += mypyc_extensions()

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
