"""Shared fixtures: real pages from ../shared/corpus when present, generated otherwise."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

PAGE = 4096
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


def _generated_pages(n: int, seed: int) -> list[bytes]:
    """Pages with realistic compressibility: text-like runs plus random noise."""
    rng = random.Random(seed)
    words = [
        bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(300)
    ]
    pages = []
    for _ in range(n):
        noise = rng.random()
        out = bytearray()
        while len(out) < PAGE:
            if rng.random() < noise * 0.5:
                out += rng.randbytes(16)
            else:
                out += rng.choice(words) + b" "
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
