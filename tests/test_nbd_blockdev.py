"""BlockDevice: tiers, read-modify-write, trim/zero, writeback and the bitmap."""

from __future__ import annotations

import asyncio
import errno
import os
import random
from pathlib import Path

import pytest

from tmem import ConfigError, RemotePageError, TmemError
from tmem.nbd.blockdev import PAGES_PER_OBJECT, BlockDevice, BlockDeviceError

PAGE = 4096


def text_page(i: int) -> bytes:
    """A compressible page that differs per i."""
    line = f"page {i:08d} some compressible words for the page store\n".encode()
    return (line * (PAGE // len(line) + 1))[:PAGE]


def partial_pages(off: int, ln: int) -> int:
    """Pages the byte range [off, off + ln) touches without covering them whole: each
    costs a write or a write_zeroes one read-modify-write."""
    pages = range(off // PAGE, (off + ln + PAGE - 1) // PAGE)
    return sum(max(off, n * PAGE) != n * PAGE or off + ln < (n + 1) * PAGE for n in pages)


def random_page(rng: random.Random) -> bytes:
    return rng.randbytes(PAGE)


def test_unwritten_reads_zero_and_roundtrip() -> None:
    dev = BlockDevice(64 * PAGE, memory="1MiB")
    assert dev.read(0, 64 * PAGE) == bytes(64 * PAGE)
    dev.write(PAGE, text_page(1))
    assert dev.read(PAGE, PAGE) == text_page(1)
    # non-exclusive: a second read still sees it
    assert dev.read(PAGE, PAGE) == text_page(1)
    assert dev.counters.ram_stores == 1


def test_unaligned_rmw_matches_bytearray_model() -> None:
    rng = random.Random(7)
    size = 32 * PAGE
    dev = BlockDevice(size, memory="1MiB")
    model = bytearray(size)
    rmw = 0
    for _ in range(300):
        off = rng.randrange(size)
        ln = rng.randrange(0, min(3 * PAGE, size - off) + 1)
        op = rng.random()
        if op < 0.6:
            data = text_page(rng.randrange(1000))[: ln % PAGE] * (ln // PAGE + 1)
            data = (data + bytes(ln))[:ln]
            dev.write(off, data)
            model[off : off + ln] = data
            rmw += partial_pages(off, ln)
        elif op < 0.8:
            dev.write_zeroes(off, ln)
            model[off : off + ln] = bytes(ln)
            rmw += partial_pages(off, ln)
        else:
            got = dev.read(off, ln)
            assert got == bytes(model[off : off + ln])
    assert dev.read(0, size) == bytes(model)
    assert dev.counters.rmw == rmw >= 1


def test_512_aligned_sector_writes() -> None:
    dev = BlockDevice(4 * PAGE, memory="1MiB")
    for s in range(8):
        dev.write(PAGE + s * 512, bytes([s + 1]) * 512)
    assert dev.read(PAGE, PAGE) == b"".join(bytes([s + 1]) * 512 for s in range(8))
    assert dev.counters.rmw == 8


def test_trim_is_hint_for_partial_pages_and_drops_whole_ones() -> None:
    dev = BlockDevice(4 * PAGE, memory="1MiB")
    dev.write(0, text_page(1) + text_page(2) + text_page(3))
    dev.trim(PAGE // 2, 2 * PAGE)  # whole page 1 only
    assert dev.read(0, PAGE) == text_page(1)
    assert dev.read(PAGE, PAGE) == bytes(PAGE)
    assert dev.read(2 * PAGE, PAGE) == text_page(3)


def test_out_of_range_is_refused_and_changes_nothing() -> None:
    dev = BlockDevice(4 * PAGE, memory="1MiB")
    dev.write(0, text_page(5))
    with pytest.raises(BlockDeviceError) as exc:
        dev.write(3 * PAGE + 1, bytes(PAGE))
    assert exc.value.errno == errno.ENOSPC
    assert isinstance(exc.value, TmemError)
    with pytest.raises(BlockDeviceError) as exc:
        dev.read(4 * PAGE, 1)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(BlockDeviceError):
        dev.trim(-1, 10)
    assert dev.read(0, PAGE) == text_page(5)
    assert dev.read(PAGE, 3 * PAGE) == bytes(3 * PAGE)


def test_bad_size_is_config_error() -> None:
    with pytest.raises(ConfigError):
        BlockDevice(1000)
    with pytest.raises(ConfigError):
        BlockDevice(0)


def test_incompressible_without_backing_is_kept_raw() -> None:
    rng = random.Random(1)
    dev = BlockDevice(16 * PAGE, memory="1MiB")
    pages = [random_page(rng) for _ in range(4)]
    dev.write(0, b"".join(pages))
    assert dev.read(0, 4 * PAGE) == b"".join(pages)
    st = dev.stats()
    assert st["blockdev_huge_pages"] == 4  # zram's huge pages: raw in a whole frame
    assert st["blockdev_ram_pages"] == 4
    assert st["blockdev_ram_stores"] == 4


def test_incompressible_goes_to_backing_file(tmp_path: Path) -> None:
    rng = random.Random(2)
    backing = tmp_path / "spill"
    dev = BlockDevice(16 * PAGE, memory="1MiB", backing=backing)
    page = random_page(rng)
    dev.write(3 * PAGE, page)
    assert dev.counters.backing_stores == 1
    with backing.open("rb") as f:
        f.seek(3 * PAGE)
        assert f.read(PAGE) == page
    assert dev.read(3 * PAGE, PAGE) == page  # incompressible: cleancache refuses it too
    # a compressible page written back by zcache is cached in the ephemeral pool
    # after the first read: first read misses and reads the file, the second hits
    assert dev.write_back(dev.pool, (0, 0, 0), 4, text_page(4))
    dev.zcache.flush_page(dev.pool, (0, 0, 0), 4)
    reads = dev.counters.backing_reads
    assert dev.read(4 * PAGE, PAGE) == text_page(4)
    assert dev.read(4 * PAGE, PAGE) == text_page(4)
    assert dev.counters.backing_reads == reads + 1
    assert dev.counters.cleancache_hits == 1
    # a cleancache copy must be invalidated by a write
    dev.write(4 * PAGE, text_page(9))
    assert dev.read(4 * PAGE, PAGE) == text_page(9)
    dev.write(3 * PAGE, text_page(8))
    assert dev.stats()["blockdev_backing_pages"] == 0
    # a partial overwrite of a backing page is RMW from the file
    page2 = random_page(rng)
    dev.write(5 * PAGE, page2)
    dev.write(5 * PAGE + 100, b"xyz")
    assert dev.read(5 * PAGE, PAGE) == page2[:100] + b"xyz" + page2[103:]
    dev.flush()
    dev.close()


def test_backing_file_is_sparse_and_bounded(tmp_path: Path) -> None:
    backing = tmp_path / "spill"
    dev = BlockDevice(1024 * PAGE, memory="1MiB", backing=backing)
    assert backing.stat().st_size == 1024 * PAGE
    assert backing.stat().st_blocks * 512 < 64 * PAGE
    dev.close()


def test_bad_backing_path_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        BlockDevice(16 * PAGE, backing=tmp_path / "no" / "such" / "dir" / "f")


def test_no_backing_enospc_when_ram_full() -> None:
    dev = BlockDevice(4096 * PAGE, memory="64KiB")
    with pytest.raises(BlockDeviceError) as exc:
        for i in range(4096):
            dev.write(i * PAGE, text_page(i))
    assert exc.value.errno == errno.ENOSPC
    assert dev.counters.enospc == 1


def test_four_times_budget_with_backing_reads_back(tmp_path: Path, anon_pages: list[bytes]) -> None:
    """Writes of 4x the RAM budget land somewhere and all read back intact."""
    # real anonymous memory (the shared corpus when present), topped up with text pages
    pages = b"".join(anon_pages) + b"".join(text_page(i) for i in range(2048 - len(anon_pages)))
    npages = len(pages) // PAGE
    mem = npages * PAGE // 4
    dev = BlockDevice(npages * PAGE, memory=mem, backing=tmp_path / "spill")
    dev.write(0, pages)
    st = dev.stats()
    assert st["blockdev_enospc"] == 0
    # every page is in exactly one place; RAM holds what fits in the budget (plus
    # same-filled pages, which take none), so the rest went to the file: zcache wrote
    # LRU pages back, or a page zcache refused was filed directly
    assert st["blockdev_ram_pages"] + st["blockdev_backing_pages"] == npages
    zs = dev.zcache.stats()
    assert zs["compr_data_size"] <= mem and st["blockdev_backing_pages"] >= 1
    assert (
        st["blockdev_writeback_pages"] + st["blockdev_backing_stores"]
        == st["blockdev_backing_pages"]
    )
    assert st["blockdev_writeback_pages"] >= 1
    # no LRU inversion: the newest writes are in RAM, the oldest went to the file
    last, first = npages - 1, 0
    assert dev.zcache.get(dev.pool, (last >> 9, 0, 0), last & 511, free=False) is not None
    assert dev.zcache.get(dev.pool, (first >> 9, 0, 0), first & 511, free=False) is None
    assert dev.read(0, len(pages)) == pages
    assert dev.counters.backing_reads > 0


def test_keys_bounded_per_object() -> None:
    dev = BlockDevice(3 * PAGES_PER_OBJECT * PAGE, memory="1MiB")
    dev.write((PAGES_PER_OBJECT - 1) * PAGE, text_page(1) + text_page(2))
    assert dev.zcache.get(dev.pool, (0, 0, 0), PAGES_PER_OBJECT - 1, free=False) == text_page(1)
    assert dev.zcache.get(dev.pool, (1, 0, 0), 0, free=False) == text_page(2)


def test_async_chunks_yield_and_match_sync() -> None:
    size = 2048 * PAGE
    dev = BlockDevice(size, memory="16MiB")
    data = b"".join(text_page(i) for i in range(1000)) + b"tail"
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async def main() -> bytes:
        t = asyncio.create_task(ticker())
        await dev.awrite(100, data)
        got = await dev.aread(100, len(data))
        await dev.awrite_zeroes(100, PAGE * 600)
        await dev.atrim(0, size)
        await dev.aflush()
        t.cancel()
        return got

    assert asyncio.run(main()) == data
    assert ticks >= 4  # other tasks ran while the big requests were processed
    assert dev.read(0, size) == bytes(size)


def test_write_back_target_rejects_foreign_pages(tmp_path: Path) -> None:
    dev = BlockDevice(16 * PAGE, memory="1MiB", backing=tmp_path / "spill")
    assert not dev.write_back(dev.pool + 5, (0, 0, 0), 0, bytes(PAGE))
    assert not dev.write_back(dev.pool, (99, 0, 0), 0, bytes(PAGE))
    assert dev.write_back(dev.pool, (0, 0, 0), 2, text_page(2))
    assert dev.stats()["blockdev_writeback_pages"] == 1
    assert os.path.getsize(tmp_path / "spill") == 16 * PAGE


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_ops_with_writeback_match_model(tmp_path: Path, seed: int) -> None:
    """Random writes (compressible, incompressible, zero, unaligned), trims, zeroes and
    reads with a budget far below the working set: every tier and writeback path is hit,
    and the device always reads like a plain bytearray."""
    rng = random.Random(seed)
    npages = 256
    size = npages * PAGE
    dev = BlockDevice(size, memory=24 * PAGE, backing=tmp_path / "spill")
    model = bytearray(size)
    rmw = 0
    for _ in range(1500):
        op = rng.random()
        off = rng.randrange(0, size, 512) if rng.random() < 0.5 else rng.randrange(size)
        ln = min(rng.choice([1, 512, PAGE, 3 * PAGE, 8 * PAGE + 100]), size - off)
        if op < 0.55:
            kind = rng.random()
            if kind < 0.5:
                data = b"".join(text_page(rng.randrange(10**6)) for _ in range(ln // PAGE + 1))
            elif kind < 0.8:
                data = rng.randbytes(ln)
            else:
                data = bytes(ln)
            data = data[:ln]
            dev.write(off, data)
            model[off : off + ln] = data
            rmw += partial_pages(off, ln)
        elif op < 0.65:
            dev.write_zeroes(off, ln)
            model[off : off + ln] = bytes(ln)
            rmw += partial_pages(off, ln)
        elif op < 0.72:
            dev.trim(off, ln)
            # whole pages inside the range read as zeros afterwards; partial ones keep data
            first = -(-off // PAGE)
            last = (off + ln) // PAGE
            for n in range(first, last):
                model[n * PAGE : (n + 1) * PAGE] = bytes(PAGE)
        else:
            assert dev.read(off, ln) == bytes(model[off : off + ln])
        if rng.random() < 0.02:  # invariant: a page lives in RAM or in the file, not both
            for n in range(npages):
                in_ram = dev.zcache.lookup(dev.pool, (n >> 9, 0, 0), n & 511) is not None
                assert not (in_ram and n in dev._in_backing), n
    assert dev.read(0, size) == bytes(model)
    pos = 0
    for length, flags in dev.block_status(0, size):  # holes must read as zeros
        if flags:
            assert model[pos : pos + length] == bytes(length)
        pos += length
    assert pos == size
    st = dev.stats()
    assert st["blockdev_writeback_pages"] > 0
    assert st["blockdev_backing_stores"] > 0
    assert st["blockdev_cleancache_misses"] > 0
    assert st["blockdev_rmw"] == rmw  # trims leave partial pages alone: no rmw
    assert st["blockdev_enospc"] == 0


class _FakeCluster:
    """Stands in for the RAMster layer: remote pampds -> pages, and the free hook."""

    def __init__(self) -> None:
        self.pages: dict[object, bytes] = {}
        self.freed: list[object] = []
        self.fetches = 0

    async def fetch(self, pool_id: int, oid: object, index: int, pampd: object) -> bytes:
        self.fetches += 1
        await asyncio.sleep(0)  # a real fetch is a network round trip
        return self.pages[pampd]

    def on_free(self, client: int, pool_id: int, oid: object, index: int, pampd: object) -> None:
        self.freed.append(pampd)


def _remotify(dev: BlockDevice, cluster: _FakeCluster, n: int, page: bytes) -> None:
    pampd = ("peer", n)
    cluster.pages[pampd] = page
    dev.zcache.install_remote(dev.pool, (n >> 9, 0, 0), n & 511, pampd)


def test_remote_pages_are_fetched_by_the_async_path() -> None:
    dev = BlockDevice(64 * PAGE, memory="1MiB")
    cluster = _FakeCluster()
    dev.zcache.remote_hooks = cluster
    dev.write(0, b"".join(text_page(i) for i in range(8)))
    _remotify(dev, cluster, 9, text_page(9))
    _remotify(dev, cluster, 12, text_page(12))
    # the sync path cannot wait for the network: it says so
    with pytest.raises(RemotePageError):
        dev.read(9 * PAGE, PAGE)

    async def main() -> bytes:
        return await dev.aread(0, 16 * PAGE)

    # no cluster attached: a clear EIO, not a crash
    with pytest.raises(BlockDeviceError) as exc:
        asyncio.run(main())
    assert exc.value.errno == errno.EIO
    dev.remote_fetch = cluster.fetch
    got = asyncio.run(main())
    expected = b"".join(text_page(i) for i in range(8)) + bytes(PAGE) + text_page(9)
    expected += bytes(2 * PAGE) + text_page(12) + bytes(3 * PAGE)
    assert got == expected
    assert cluster.fetches == 2 and dev.counters.remote_fetches == 2
    assert sorted(cluster.freed) == [("peer", 9), ("peer", 12)]  # repatriated: remote freed
    assert dev.read(9 * PAGE, PAGE) == text_page(9)  # local now

    # an unaligned write over a remote page: RMW fetches it first
    _remotify(dev, cluster, 20, text_page(20))
    asyncio.run(dev.awrite(20 * PAGE + 10, b"XYZ"))
    assert dev.read(20 * PAGE, PAGE) == text_page(20)[:10] + b"XYZ" + text_page(20)[13:]
    # a whole-page write over a remote page needs no fetch (the remote copy is freed)
    _remotify(dev, cluster, 21, text_page(21))
    fetches = cluster.fetches
    asyncio.run(dev.awrite(21 * PAGE, text_page(99)))
    assert cluster.fetches == fetches and ("peer", 21) in cluster.freed
    assert dev.read(21 * PAGE, PAGE) == text_page(99)


def test_read_extents_pages_and_merged_holes() -> None:
    dev = BlockDevice(2048 * PAGE, memory="1MiB")
    dev.write(2 * PAGE, text_page(2) + text_page(3))
    dev.write(600 * PAGE, text_page(600))
    ext = dev.read_extents(0, 8 * PAGE)
    assert ext == [2 * PAGE, text_page(2) + text_page(3), 4 * PAGE]
    assert dev.read_extents(100, 50) == [bytes(50)]  # unaligned: one buffer
    assert dev.read_extents(0, 0) == []
    # async: holes merge across the 1 MiB chunks too
    got = asyncio.run(dev.aread_extents(4 * PAGE, 1000 * PAGE))
    assert got == [596 * PAGE, text_page(600), 403 * PAGE]
    flat = b"".join(bytes(e) if isinstance(e, int) else e for e in got)
    assert flat == dev.read(4 * PAGE, 1000 * PAGE)


def test_backing_file_old_contents_discarded_and_emptied_on_close(tmp_path: Path) -> None:
    backing = tmp_path / "spill"
    backing.write_bytes(b"old run " * 100000)  # a leftover from a previous run
    dev = BlockDevice(16 * PAGE, memory="1MiB", backing=backing)
    assert backing.stat().st_size == 16 * PAGE
    assert dev.read(0, 16 * PAGE) == bytes(16 * PAGE)
    dev.write_back(dev.pool, (0, 0, 0), 1, text_page(1))
    dev.close()
    dev.close()  # idempotent
    assert backing.stat().st_size == 0


def test_block_status_extents(tmp_path: Path) -> None:
    from tmem.nbd import blockdev

    dev = BlockDevice(64 * PAGE, memory="64KiB", backing=tmp_path / "spill")
    assert dev.block_status(0, 64 * PAGE) == [(64 * PAGE, 3)]
    dev.write(4 * PAGE, b"".join(text_page(i) for i in range(30)))  # RAM + writeback
    dev.write(40 * PAGE, random.Random(5).randbytes(PAGE))  # backing file
    dev.trim(10 * PAGE, 2 * PAGE)
    assert dev.block_status(0, 64 * PAGE) == [
        (4 * PAGE, 3), (6 * PAGE, 0), (2 * PAGE, 3), (22 * PAGE, 0), (6 * PAGE, 3),
        (PAGE, 0), (23 * PAGE, 3),
    ]  # fmt: skip
    assert dev.block_status(5 * PAGE + 100, 10) == [(PAGE - 100, 0)]
    assert dev.block_status(0, 0) == []
    # a huge request is answered in part (the client asks again for the rest)
    old = blockdev.STATUS_PAGES
    blockdev.STATUS_PAGES = 8
    try:
        assert dev.block_status(0, 64 * PAGE) == [(4 * PAGE, 3), (4 * PAGE, 0)]
    finally:
        blockdev.STATUS_PAGES = old
    with pytest.raises(BlockDeviceError):
        dev.block_status(60 * PAGE, 8 * PAGE)


def test_read_runs_match_read_extents() -> None:
    dev = BlockDevice(2048 * PAGE, memory="1MiB")
    dev.write(2 * PAGE, text_page(2) + text_page(3))
    dev.write(600 * PAGE, text_page(600))
    runs = dev.read_runs(0, 8 * PAGE)  # data runs are lists of buffers (views, uncopied)
    assert [r if isinstance(r, int) else b"".join(r) for r in runs] == [
        2 * PAGE, text_page(2) + text_page(3), 4 * PAGE,
    ]  # fmt: skip
    assert dev.read_runs(100, 50) == [[bytes(50)]]
    assert dev.read_runs(0, 0) == []
    flat = b"".join(
        bytes(e) if isinstance(e, int) else b"".join(e) for e in dev.read_runs(0, 8 * PAGE)
    )
    assert flat == dev.read(0, 8 * PAGE)
    runs = dev.read_runs(0, 700 * PAGE)
    assert [e if isinstance(e, int) else b"".join(e) for e in runs] == dev.read_extents(
        0, 700 * PAGE
    )
    with pytest.raises(BlockDeviceError):
        dev.read_runs(2047 * PAGE, 2 * PAGE)


@pytest.mark.parametrize("behind", [False, True])
def test_four_times_budget_with_compress_behind(
    tmp_path: Path, anon_pages: list[bytes], behind: bool
) -> None:
    """With compress-behind, a write into a full budget compacts staged pages before
    anything is written back; every tier reads back intact, through read, read_runs
    (views of one buffer, holes, backing pages) and across object boundaries."""
    rng = random.Random(7)
    npages = 3 * PAGES_PER_OBJECT
    pages = [
        random_page(rng) if i % 9 == 0 else anon_pages[i % len(anon_pages)] for i in range(npages)
    ]
    dev = BlockDevice(
        npages * PAGE, memory=npages * PAGE // 4, backing=tmp_path / "spill",
        compress_behind=behind,
    )  # fmt: skip
    for start in range(0, npages, 64):
        dev.write(start * PAGE, b"".join(pages[start : start + 64]))
    dev.trim(100 * PAGE, 3 * PAGE)
    for n in (100, 101, 102):
        pages[n] = bytes(PAGE)
    while dev.zcache.compact(256):
        pass
    st = dev.stats()
    assert st["blockdev_enospc"] == 0 and st["blockdev_staged_pages"] == 0
    assert st["blockdev_backing_pages"] > 0
    want = b"".join(pages)
    assert dev.read(0, npages * PAGE) == want
    for offset, length in ((0, npages), (95, 10), (PAGES_PER_OBJECT - 3, 7), (1, 2 * 512)):
        runs = dev.read_runs(offset * PAGE, length * PAGE)
        flat = b"".join(bytes(r) if isinstance(r, int) else b"".join(r) for r in runs)
        assert flat == want[offset * PAGE : (offset + length) * PAGE]
    assert 3 * PAGE in dev.read_runs(96 * PAGE, 8 * PAGE)  # the trimmed pages are a hole


def test_reading_holes_is_not_a_failed_get() -> None:
    """Unwritten (or trimmed) blocks read as zeros by design: no get failed. A get that
    misses a page the caller stored is still counted."""
    dev = BlockDevice(64 * PAGE, memory="1MiB")
    dev.write(2 * PAGE, text_page(2))
    assert dev.read(0, 8 * PAGE)[2 * PAGE : 3 * PAGE] == text_page(2)  # 7 holes, aligned
    assert dev.read(5 * PAGE + 100, 3000) == bytes(3000)  # a hole, unaligned
    dev.read_runs(0, 16 * PAGE)
    dev.write(9 * PAGE + 10, b"rmw over a hole")
    dev.trim(2 * PAGE, PAGE)
    assert dev.read(2 * PAGE, PAGE) == bytes(PAGE)
    assert dev.counters.zero_reads > 0
    assert dev.zcache.stats()["failed_gets"] == 0
    zc = dev.zcache
    cache = zc.new_pool(persistent=False)
    assert zc.get(cache, (1, 0, 0), 0) is None  # a cleancache miss is one
    assert zc.stats()["failed_gets"] == 1
