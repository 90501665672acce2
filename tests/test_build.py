"""The build under test is the one that was asked for.

A compile that fell back to pure Python, or a stale extension shadowing the sources,
would otherwise pass every other test unnoticed. ``.ci/run`` sets TMEM_EXPECT_BUILD to
``compiled`` or ``pure`` for each run of the suite.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import os
from pathlib import Path

import pytest

import tmem.compress

ROOT = Path(__file__).resolve().parents[1]


def _compiled_module_names() -> list[str]:
    """setup.py's COMPILED list, as module names (one list, read where it is kept)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "COMPILED":
            paths = ast.literal_eval(node.value)
            return [p.removeprefix("src/").removesuffix(".py").replace("/", ".") for p in paths]
    raise AssertionError("setup.py has no COMPILED list")


def _is_extension(module_name: str) -> bool:
    path = importlib.import_module(module_name).__file__ or ""
    return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def test_build_is_the_one_asked_for() -> None:
    expected = os.environ.get("TMEM_EXPECT_BUILD")
    if expected is None:
        pytest.skip("TMEM_EXPECT_BUILD is not set (.ci/run sets it to compiled or pure)")
    names = _compiled_module_names()
    assert len(names) >= 9
    compiled = {name: _is_extension(name) for name in names}
    if expected == "compiled":
        assert all(compiled.values()), f"not compiled: {[n for n, c in compiled.items() if not c]}"
        assert tmem.compress._lz4pages is not None, "tmem._lz4pages was not built"
    else:
        assert expected == "pure", f"TMEM_EXPECT_BUILD={expected!r}: say compiled or pure"
        assert not any(compiled.values()), f"compiled: {[n for n, c in compiled.items() if c]}"
        assert tmem.compress._lz4pages is None
