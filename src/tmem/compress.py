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
from typing import Final

import lz4.block
import zstandard

from tmem.errors import ConfigError

try:  # built by setup.py where liblz4's header exists; python-lz4 otherwise
    from tmem import _lz4pages
except ImportError:  # pragma: no cover - depends on the build
    _lz4pages = None  # type: ignore[assignment]

PAGE_SIZE: Final = 4096
# What compressors take: a page as bytes or as a view of a caller's buffer (no copy).
Buffer = bytes | bytearray | memoryview

# find_fills(pages) -> [index, pattern, ...]: the pages of a buffer of whole pages that
# are one 8-byte value repeated (see tmem._lz4pages.fills). None without the extension:
# a Python scan would cost more than it saves, so callers then skip the early check.
find_fills: Callable[[Buffer], list[int]] | None = (
    _lz4pages.fills if _lz4pages is not None else None
)


@dataclass(frozen=True, slots=True)
class Compressor:
    """A named page codec. ``compress`` takes any contiguous buffer of a page;
    ``decompress(data)`` takes any buffer (a view of the arena), returns PAGE_SIZE bytes.

    ``gather(arena, spans)``, when present, reads a run of stored pages out of an arena
    in one call (see :mod:`tmem._lz4pages`); zcache falls back to one decompress per
    page without it.
    """

    name: str
    compress: Callable[[Buffer], bytes]
    decompress: Callable[[Buffer], bytes]
    gather: Callable[[object, list[int]], bytearray] | None = None


def _lz4() -> Compressor:
    if _lz4pages is not None:  # same block format, minus python-lz4's copies
        return Compressor("lz4", _lz4pages.compress, _lz4pages.decompress, _lz4pages.gather)
    # functools.partial calls straight into C: no Python frame on the hot path.
    c = partial(lz4.block.compress, store_size=False)
    d = partial(lz4.block.decompress, uncompressed_size=PAGE_SIZE)
    return Compressor("lz4", c, d)


def _lzo() -> Compressor:
    # python-lzo is an extra: it has no wheels and builds only against liblzo2-dev.
    try:
        import lzo
    except ImportError:
        raise ConfigError(
            "the lzo compressor needs python-lzo: pip install 'tmem[lzo]' (builds against "
            "liblzo2-dev); lz4 and zstd need nothing more"
        ) from None
    compress = lzo.compress
    decompress = lzo.decompress

    def c(page: Buffer) -> bytes:
        if type(page) is not bytes:  # python-lzo wants read-only bytes
            page = bytes(page)
        return compress(page, 1, False)  # type: ignore[no-any-return]

    def d(data: Buffer) -> bytes:
        if type(data) is not bytes:  # an arena view: python-lzo wants read-only bytes
            data = bytes(data)
        out: bytes = decompress(data, False, PAGE_SIZE)
        if len(out) != PAGE_SIZE:
            raise ValueError("lzo: decompressed page has the wrong size")
        return out

    return Compressor("lzo", c, d)


def _zstd(level: int = 1) -> Compressor:
    # One context each way, reused: creating a context per page costs more than
    # compressing the page. Its parameters are sized for one 4 KiB input (a 4 KiB
    # window, small tables): the default level-1 context takes 1 MiB for nothing here.
    params = zstandard.ZstdCompressionParameters.from_level(
        level, source_size=PAGE_SIZE, write_content_size=False, write_checksum=False
    )
    cctx = zstandard.ZstdCompressor(compression_params=params)
    dctx = zstandard.ZstdDecompressor()
    compress = cctx.compress
    decompress = dctx.decompress

    def d(data: Buffer) -> bytes:
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
