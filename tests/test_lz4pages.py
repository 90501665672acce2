"""The tmem._lz4pages codec: same LZ4 block format as python-lz4, bounds-checked gather.

Marked ``extension``: a pure build (no liblz4 header, or TMEM_PURE_PYTHON=1) uses
python-lz4 instead, and its test run deselects these with ``-m "not extension"``.
"""

from __future__ import annotations

import os

import lz4.block
import pytest

try:
    from tmem import _lz4pages
except ImportError:  # a pure build: every test here skips (and fails under CI)
    _lz4pages = None  # type: ignore[assignment]

pytestmark = pytest.mark.extension
PAGE = 4096


@pytest.fixture(autouse=True)
def _extension_built() -> None:
    if _lz4pages is None:
        pytest.skip("tmem._lz4pages was not built")


def test_blocks_interoperate_with_python_lz4(anon_pages: list[bytes]) -> None:
    """Pages stored by one codec (or sent by a RAMster peer using the other) read back."""
    for page in anon_pages[:2000]:
        ours = _lz4pages.compress(page)
        theirs = lz4.block.compress(page, store_size=False)
        assert _lz4pages.decompress(theirs) == page
        assert lz4.block.decompress(ours, uncompressed_size=PAGE) == page
        assert _lz4pages.decompress(memoryview(ours)) == page


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="at most 4096"):
        _lz4pages.compress(bytes(PAGE + 1))
    with pytest.raises(ValueError, match="corrupt"):
        _lz4pages.decompress(os.urandom(200))
    short = lz4.block.compress(bytes(100) + b"x" * 50, store_size=False)
    with pytest.raises(ValueError, match="corrupt"):  # a valid block, but not a page
        _lz4pages.decompress(short)
    with pytest.raises(TypeError):
        _lz4pages.compress("not bytes")


def test_gather_reads_every_kind_of_page(anon_pages: list[bytes]) -> None:
    # zcache stores a page raw when LZ4 does not shrink it, so a compressed span
    # is always shorter than a page: gather only ever sees such blocks.
    compressible = [p for p in anon_pages if len(_lz4pages.compress(p)) < PAGE][:10]
    assert len(compressible) == 10
    blocks = [_lz4pages.compress(p) for p in compressible]
    arena = bytearray(b"".join(blocks) + anon_pages[10])
    spans: list[int] = []
    pos = 0
    for b in blocks:
        spans += [pos, len(b)]
        pos += len(b)
    spans += [pos, PAGE]  # a raw page
    spans += [0xFFEE_DDCC_BBAA_9988, 0]  # same-filled: any 64-bit pattern
    spans += [0, -1]  # missing: zeros
    out = _lz4pages.gather(arena, spans)
    assert isinstance(out, bytearray)
    pattern = (0xFFEE_DDCC_BBAA_9988).to_bytes(8, "little") * 512
    want = b"".join(compressible) + anon_pages[10] + pattern
    assert out == want + bytes(PAGE)
    assert _lz4pages.gather(arena, []) == bytearray()


@pytest.mark.parametrize(
    "spans",
    [
        [0, PAGE + 1],  # longer than a page
        [-1, 10],  # before the arena
        [8000, 200],  # past its end
        [0, -2],  # unknown kind
        [0],  # not pairs
        [0, 5],  # not an LZ4 block of a page
        [1 << 70, 5],  # offset does not fit
        ["x", 5],
    ],
)
def test_gather_refuses_bad_spans(spans: list[object]) -> None:
    arena = bytes(8100)
    with pytest.raises((ValueError, TypeError, OverflowError)):
        _lz4pages.gather(arena, spans)  # type: ignore[arg-type]


def test_fills_finds_exactly_the_same_filled_pages(anon_pages: list[bytes]) -> None:
    pattern = bytes(range(1, 9))
    almost = bytearray(PAGE)
    almost[PAGE - 1] = 1  # zero but for the last byte
    shifted = b"\x01" + pattern * 511 + b"\x02" * 7  # 8-periodic from byte 1 only
    pages = [anon_pages[0], bytes(PAGE), pattern * 512, bytes(almost), shifted, b"\xff" * PAGE]
    found = _lz4pages.fills(memoryview(b"".join(pages)))
    assert found == [1, 0, 2, int.from_bytes(pattern, "little"), 5, (1 << 64) - 1]
    assert _lz4pages.fills(b"") == []
    with pytest.raises(ValueError, match="whole 4096-byte pages"):
        _lz4pages.fills(bytes(PAGE + 8))
    with pytest.raises(TypeError):
        _lz4pages.fills("not a buffer")
