"""Page compressors: lz4 (default), LZO and zstd, behind one tiny interface.

The kernel used the crypto API with one transform per CPU; here a compressor is
a pair of plain functions so the put/get hot path pays one call each way.
Decompression always yields exactly PAGE_SIZE bytes or raises: a short page is
corruption, not data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import lz4.block
import lzo
import zstandard

from tmem.errors import ConfigError

PAGE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Compressor:
    """A named page codec. ``decompress(data)`` takes bytes, returns PAGE_SIZE bytes."""

    name: str
    compress: Callable[[bytes], bytes]
    decompress: Callable[[bytes], bytes]


def _lz4() -> Compressor:
    # functools.partial calls straight into C: no Python frame on the hot path.
    c = partial(lz4.block.compress, store_size=False)
    d = partial(lz4.block.decompress, uncompressed_size=PAGE_SIZE)
    return Compressor("lz4", c, d)


def _lzo() -> Compressor:
    compress = lzo.compress
    decompress = lzo.decompress

    def c(page: bytes) -> bytes:
        if type(page) is not bytes:  # python-lzo wants read-only bytes
            page = bytes(page)
        return compress(page, 1, False)  # type: ignore[no-any-return]

    def d(data: bytes) -> bytes:
        out: bytes = decompress(data, False, PAGE_SIZE)
        if len(out) != PAGE_SIZE:
            raise ValueError("lzo: decompressed page has the wrong size")
        return out

    return Compressor("lzo", c, d)


def _zstd(level: int = 1) -> Compressor:
    # One context each way, reused: creating a context per page costs more than
    # compressing the page.
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=False, write_checksum=False)
    dctx = zstandard.ZstdDecompressor()
    compress = cctx.compress
    decompress = dctx.decompress

    def d(data: bytes) -> bytes:
        out: bytes = decompress(data, max_output_size=PAGE_SIZE)
        if len(out) != PAGE_SIZE:
            raise ValueError("zstd: decompressed page has the wrong size")
        return out

    return Compressor(f"zstd-{level}" if level != 1 else "zstd", compress, d)


def get_compressor(name: str) -> Compressor:
    """Return the compressor called ``name``: ``lz4``, ``lzo``, ``zstd`` or ``zstd-N``."""
    key = name.lower().strip()
    if key == "lz4":
        return _lz4()
    if key in ("lzo", "lzo1x"):
        return _lzo()
    if key == "zstd":
        return _zstd()
    if key.startswith("zstd-"):
        try:
            level = int(key[5:])
        except ValueError:
            level = 0
        if 1 <= level <= 22:
            return _zstd(level)
    raise ConfigError(f"unknown compressor {name!r}; choose from {', '.join(COMPRESSORS)}")


COMPRESSORS: tuple[str, ...] = ("lz4", "lzo", "zstd")
