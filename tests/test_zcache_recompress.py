"""Tiered compression: pages stored with the fast codec are recompressed with a strong
one once idle (zram's recompress, without the manual chore)."""

from __future__ import annotations

import pytest

from tmem import Zcache
from tmem.compress import get_compressor
from tmem.errors import ConfigError

PAGE = 4096


@pytest.mark.parametrize("allocator", ["zsmalloc", "zbud"])
def test_idle_pages_are_recompressed_and_read_back(anon_pages: list[bytes], allocator: str) -> None:
    zc = Zcache(
        "16MiB", huge_pages=True, recompress="zstd", recompress_after=30.0, allocator=allocator
    )
    pool = zc.new_pool(persistent=True)
    pages = anon_pages[:600]
    for i, page in enumerate(pages):
        assert zc.put(pool, (0, 0, 1), i, page)
    bytes_before = zc.stats()["compr_data_size"]
    assert zc.recompress(10_000) == 0  # nothing is 30 s old yet
    later = zc.pages.now() + 31
    looked = zc.recompress(10_000, now=later)
    stats = zc.stats()
    assert looked == 600 - stats["same_filled_pages"]  # every stored page, once
    assert stats["recompressed_pages"] == stats["strong_pages"] > 300
    # raw (huge) pages are passed over: they did not compress with the fast codec
    done = stats["recompressed_pages"] + stats["recompress_skipped"]
    assert done == looked - stats["huge_pages"]
    saved = stats["recompress_saved_bytes"]
    assert saved > 0 and stats["compr_data_size"] == bytes_before - saved
    assert zc.recompress(10_000, now=later) == 0  # each page is looked at once
    for i, page in enumerate(pages):
        assert zc.get(pool, (0, 0, 1), i) == page
    run, missing = zc.read_run(pool, (0, 0, 1), 0, 600)
    assert missing == [] and bytes(run) == b"".join(pages)
    assert zc.check_frames() == []


def test_new_puts_after_a_walk_are_recompressed_later(anon_pages: list[bytes]) -> None:
    zc = Zcache("16MiB", huge_pages=True, recompress="zstd", recompress_after=10.0)
    pool = zc.new_pool(persistent=True)
    for i in range(100):
        zc.put(pool, (0, 0, 1), i, anon_pages[i])
    zc.recompress(10_000, now=zc.pages.now() + 11)
    first = zc.stats()["recompressed_pages"]
    for i in range(100, 200):  # younger pages, put after the walk reached the end
        zc.put(pool, (0, 0, 1), i, anon_pages[i])
    zc.put(pool, (0, 0, 1), 5, anon_pages[300])  # a rewrite is a young page again
    zc.recompress(10_000, now=zc.pages.now() + 11)
    assert zc.stats()["recompressed_pages"] > first + 50
    for i in range(200):
        want = anon_pages[300] if i == 5 else anon_pages[i]
        assert zc.get(pool, (0, 0, 1), i) == want
    assert zc.check_frames() == []


def test_recompressed_pages_leave_in_the_compressor_form(anon_pages: list[bytes]) -> None:
    """Peers and writeback get pages in the Zcache's own compressor's form."""
    zc = Zcache("16MiB", huge_pages=True, recompress="zstd", recompress_after=0.0)
    pool = zc.new_pool(persistent=True)
    for i in range(50):
        zc.put(pool, (0, 0, 1), i, anon_pages[i])
    zc.recompress(10_000, now=zc.pages.now() + 1)
    assert zc.stats()["strong_pages"] > 0
    lz4 = get_compressor("lz4")
    for i in range(50):
        got = zc.get_compressed(pool, (0, 0, 1), i)
        assert got is not None
        data, compressed = got
        assert (lz4.decompress(data) if compressed else data) == anon_pages[i]
    zombies = zc.zombify_lru(True)
    assert zombies
    for z in zombies:
        page = zc.decompress(z.data) if z.compressed else z.data
        assert page == anon_pages[z.index]
        zc.unzombify(z)
    assert zc.check_frames() == []


def test_recompression_raises_density(anon_pages: list[bytes]) -> None:
    fast = Zcache("32MiB", huge_pages=True)
    tiered = Zcache("32MiB", huge_pages=True, recompress="zstd", recompress_after=0.0)
    for zc in (fast, tiered):
        pool = zc.new_pool(persistent=True)
        for i, page in enumerate(anon_pages[:1000]):
            zc.put(pool, (0, 0, 1), i, page)
        zc.recompress(10_000, now=zc.pages.now() + 1)
        zc.compact_all()
    assert tiered.frames_used < fast.frames_used * 0.8


def test_bad_recompress_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown compressor"):
        Zcache("1MiB", recompress="brotli")
    with pytest.raises(ConfigError, match="recompress_after"):
        Zcache("1MiB", recompress="zstd", recompress_after=-1)
    assert Zcache("1MiB", recompress="none").strong is None
