"""Shared fixtures: real pages from ../shared/corpus when present, generated otherwise.

Under CI (``CI=true``) a skip is a failure: CI installs every tool, extension and
privilege the suite needs, so a skip there means something is missing, not that the
test does not apply. A build that is pure Python on purpose deselects the tests of
the compiled extension with ``-m "not extension"`` rather than skipping them.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

PAGE = 4096


def _find_corpus() -> Path:
    """``shared/corpus`` beside the checkout (or beside any folder above it)."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "corpus"
        if candidate.is_dir():
            return candidate
    return Path("/nonexistent/shared/corpus")


CORPUS = _find_corpus()
ON_CI = os.environ.get("CI") == "true"


def _fail_skip_on_ci(report: pytest.CollectReport | pytest.TestReport) -> None:
    if ON_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where nothing may be missing: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    _fail_skip_on_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    _fail_skip_on_ci(outcome.get_result())


def _generated_pages(n: int, seed: int) -> list[bytes]:
    """Pages that compress like real memory (lz4 about 2-3x, a few incompressible).

    Records from a small vocabulary, 8-byte "pointers" sharing their high bytes, zero
    runs and a page-dependent share of random bytes.
    """
    rng = random.Random(seed)
    words = [
        bytes(rng.choice(b"etaoinshrdlu_") for _ in range(rng.randint(3, 8))) for _ in range(60)
    ]
    phrases = [b" ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) for _ in range(40)]
    pages = []
    for _ in range(n):
        noise = rng.choice((0.0, 0.01, 0.02, 0.04, 0.08, 0.9))
        base = rng.randrange(1 << 40) << 16
        out = bytearray()
        while len(out) < PAGE:
            roll = rng.random()
            if roll < noise:
                out += rng.randbytes(rng.randint(4, 32))
            elif roll < noise + 0.25:
                out += (base + rng.randrange(1 << 12) * 8).to_bytes(8, "little")
            elif roll < noise + 0.35:
                out += bytes(rng.choice((8, 16, 64)))
            else:
                out += rng.choice(phrases) + b"=" + str(rng.randrange(16)).encode() + b";"
        pages.append(bytes(out[:PAGE]))
    return pages


@pytest.fixture(scope="session")
def anon_pages() -> list[bytes]:
    """Anonymous-memory pages (frontswap-like): the shared corpus or a generated stand-in."""
    path = CORPUS / "anon.pages"
    if path.exists() and not os.environ.get("TMEM_NO_CORPUS"):
        blob = path.read_bytes()
        return [blob[i : i + PAGE] for i in range(0, len(blob), PAGE)]
    return _generated_pages(512, seed=1)


@pytest.fixture(scope="session")
def file_pages() -> list[bytes]:
    """Clean file pages (cleancache-like)."""
    path = CORPUS / "file.pages"
    if path.exists() and not os.environ.get("TMEM_NO_CORPUS"):
        blob = path.read_bytes()
        return [blob[i : i + PAGE] for i in range(0, len(blob), PAGE)]
    return _generated_pages(512, seed=2)
