"""Compress-behind: persistent puts staged raw in free frames, compressed by compact().

What users rely on: every accepted page reads back byte-identical whether it is staged,
compacted or written back; staging never takes the budget's last frames; once compacted
the store is as dense as one that compressed at put time; and runs of pages go through
put_run/read_run exactly as through put/get.
"""

from __future__ import annotations

import os

import pytest

from tmem import Zcache
from tmem.compress import find_fills, get_compressor
from tmem.errors import PageSizeError, RemotePageError, TmemError
from tmem.pagetable import L_STAGED
from tmem.zcache import PutResult

PAGE = 4096


def fill(zc: Zcache, pool: int, pages: list[bytes]) -> list[bool]:
    return [zc.put(pool, (n >> 9, 0, 0), n & 511, p) for n, p in enumerate(pages)]


def read_all(zc: Zcache, pool: int, n: int) -> list[bytes | None]:
    return [zc.get(pool, (i >> 9, 0, 0), i & 511) for i in range(n)]


def test_puts_are_staged_raw_and_compact_compresses_them(anon_pages: list[bytes]) -> None:
    pages = anon_pages[:600]
    # With the C helper, same-filled pages (zero pages) are stored as their pattern at
    # put time and never staged; without it, compaction finds them.
    same_filled = sum(p == p[:8] * (PAGE // 8) for p in pages) if find_fills else 0
    staged = len(pages) - same_filled
    zc = Zcache("8MiB", compress_behind=True, prefault=False)
    pool = zc.new_pool(persistent=True)
    assert all(fill(zc, pool, pages))
    assert zc.staged_pages == staged == zc.frames_used  # one raw frame each
    assert read_all(zc, pool, len(pages)) == pages  # readable while staged

    done = 0
    while step := zc.compact(100):
        done += step
    assert done == staged and zc.staged_pages == 0
    stats = zc.stats()
    assert stats["compacted_pages"] == staged
    assert stats["staged_pages_total"] == staged
    assert read_all(zc, pool, len(pages)) == pages

    # as dense as compressing at put time (placement order may differ a little)
    sync = Zcache("8MiB", prefault=False, huge_pages=True)
    spool = sync.new_pool(persistent=True)
    fill(sync, spool, pages)
    assert zc.frames_used <= sync.frames_used * 1.02 + 2
    assert zc.frames_used < len(pages) * 0.7


def test_staging_keeps_the_reserve_then_compresses_at_put_time(anon_pages: list[bytes]) -> None:
    zc = Zcache(64 * PAGE, compress_behind=True, prefault=False)
    zc.stage_reserve = 16
    pool = zc.new_pool(persistent=True)
    fill(zc, pool, anon_pages[:48])
    staged = zc.staged_pages  # staged while more than the reserve was free (the budget
    assert 48 - 8 <= staged < 48  # less what metadata takes), then compressed at put
    assert zc.stats()["pers_zpages"] == 48 and zc.stats()["huge_pages"] == 0


def test_a_full_budget_of_staged_pages_still_takes_puts(anon_pages: list[bytes]) -> None:
    """Puts that find no free frame compact staged pages instead of failing."""
    pages = anon_pages[:400]
    zc = Zcache(128 * PAGE, compress_behind=True, prefault=False, huge_pages=True)
    zc.stage_reserve = 0
    pool = zc.new_pool(persistent=True)
    sync = Zcache(128 * PAGE, prefault=False, huge_pages=True)
    spool = sync.new_pool(persistent=True)
    got = fill(zc, pool, pages)
    want = fill(sync, spool, pages)
    assert zc.check_frames() == []
    # the same pages fit: staging never costs capacity
    assert sum(got) >= sum(want) - 2
    for n, (ok, page) in enumerate(zip(got, pages, strict=True)):
        if ok:
            assert zc.get(pool, (n >> 9, 0, 0), n & 511) == page


def test_rewrites_and_flushes_of_staged_pages(anon_pages: list[bytes]) -> None:
    zc = Zcache("1MiB", compress_behind=True, prefault=False)
    pool = zc.new_pool(persistent=True)
    a, b = anon_pages[0], anon_pages[1]
    for _ in range(3000):  # each rewrite stages a new frame; stale queue entries are pruned
        zc.put(pool, (0, 0, 0), 1, a)
        zc.put(pool, (0, 0, 0), 1, b)
    assert zc.staged_pages == 1
    assert zc.pages.count[L_STAGED] == 1  # the staged list holds live pages only
    assert zc.flush_page(pool, (0, 0, 0), 1)
    assert zc.staged_pages == 0 and zc.frames_used == 0
    assert zc.compact(10) == 0


@pytest.mark.parametrize(
    "early",
    [pytest.param(True, marks=pytest.mark.extension), False],
    ids=["found-staging", "found-compacting"],
)
def test_same_filled_and_incompressible_staged_pages(
    early: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tmem.zcache

    if not early:  # as without the C helper: same-filled pages are staged, then found
        monkeypatch.setattr(tmem.zcache, "find_fills", None)
    elif tmem.zcache.find_fills is None:
        pytest.skip("tmem._lz4pages not built")
    zc = Zcache("1MiB", compress_behind=True, prefault=False)
    pool = zc.new_pool(persistent=True)
    noise = os.urandom(PAGE)
    pattern = b"\x01\x02\x03\x04\x05\x06\x07\x08" * 512
    assert zc.put(pool, (1, 0, 0), 0, noise)
    assert zc.put(pool, (1, 0, 0), 1, pattern)
    assert zc.frames_used == (1 if early else 2)
    assert zc.compact() == (1 if early else 2)
    stats = zc.stats()
    assert stats["huge_pages"] == 1  # accepted, so kept: raw
    assert stats["same_filled_pages"] == 1
    assert zc.frames_used == 1
    assert zc.get(pool, (1, 0, 0), 0) == noise
    assert zc.get(pool, (1, 0, 0), 1) == pattern


class Spill:
    """A writeback target that keeps what it was given."""

    def __init__(self) -> None:
        self.pages: dict[tuple[int, int], bytes] = {}

    def write_back(self, pool_id: int, oid: tuple[int, int, int], index: int, page: bytes) -> bool:
        self.pages[(oid[0], index)] = page
        return True


def test_incompressible_staged_page_goes_to_the_writeback_target() -> None:
    spill = Spill()
    zc = Zcache("1MiB", compress_behind=True, prefault=False, writeback=spill)
    pool = zc.new_pool(persistent=True)
    noise = os.urandom(PAGE)
    assert zc.put(pool, (2, 0, 0), 5, noise)
    assert zc.compact() == 1
    assert spill.pages == {(2, 5): noise}
    assert zc.get(pool, (2, 0, 0), 5) is None and zc.frames_used == 0
    assert zc.stats()["writtenback_pages"] == 1


def test_staged_pages_are_compacted_before_anything_is_written_back(
    anon_pages: list[bytes],
) -> None:
    """A full budget of staged pages: new puts compact them instead of writing back."""
    spill = Spill()
    zc = Zcache(64 * PAGE, compress_behind=True, prefault=False, writeback=spill)
    zc.stage_reserve = 0
    pool = zc.new_pool(persistent=True)
    lz4 = get_compressor("lz4").compress
    compressible = [p for p in anon_pages if 64 < len(lz4(p)) < 1900][:100]
    assert len(compressible) == 100
    assert zc.zombify_lru(True) == []  # staged frames are on no LRU
    assert all(fill(zc, pool, compressible))
    stats = zc.stats()
    # staged while any frame was free (the budget less what metadata takes; frames
    # compaction freed were staged into again)
    staged_total = stats["staged_pages_total"]
    assert 56 <= staged_total < 100
    # the puts after the budget filled made room by compressing staged pages
    assert stats["compacted_pages"] == staged_total - stats["staged_pages"] >= 10
    assert spill.pages == {}  # nothing had to leave RAM
    assert read_all(zc, pool, 100) == compressible


@pytest.mark.parametrize("compressor", ["lz4", "zstd"])  # zstd: the per-page path
def test_put_run_and_read_run(anon_pages: list[bytes], compressor: str) -> None:
    for behind in (False, True):
        zc = Zcache("4MiB", compressor, compress_behind=behind, prefault=False, huge_pages=True)
        pool = zc.new_pool(persistent=True)
        run = anon_pages[:64]
        assert zc.put_run(pool, (7, 0, 0), 100, b"".join(run)) == 64
        assert zc.put_run(pool, (7, 0, 0), 200, memoryview(b"".join(run[:3]))) == 3
        zc.put(pool, (7, 0, 0), 97, b"\x07" * 8 * 512)  # same-filled: no frame
        got, missing = zc.read_run(pool, (7, 0, 0), 97, 70)
        assert missing == [1, 2, 67, 68, 69]
        assert got == b"\x07" * PAGE + bytes(2 * PAGE) + b"".join(run) + bytes(3 * PAGE)
        assert zc.read_run(pool, (8, 0, 0), 0, 3) == (bytes(3 * PAGE), [0, 1, 2])
        assert zc.read_run(pool, (7, 0, 0), 200, 3) == (b"".join(run[:3]), [])
        assert zc.read_run(pool, (7, 0, 0), 0, 0) == (b"", [])


def test_staged_runs_on_consecutive_and_scattered_free_frames(anon_pages: list[bytes]) -> None:
    """stage_run copies a run of consecutive free frames in one go and scattered ones
    page by page: both must land every page where its handle says."""
    zc = Zcache("2MiB", compress_behind=True, prefault=False)
    pool = zc.new_pool(persistent=True)
    pages = anon_pages[:40]
    assert zc.put_run(pool, (1, 0, 0), 0, b"".join(pages)) == 40  # a fresh arena
    for i in range(0, 40, 3):  # free every third frame: the stack is scattered now
        zc.flush_page(pool, (1, 0, 0), i)
    assert zc.put_run(pool, (2, 0, 0), 0, b"".join(pages[10:20])) == 10
    got, missing = zc.read_run(pool, (2, 0, 0), 0, 10)
    assert missing == [] and got == b"".join(pages[10:20])
    assert zc.staged_pages == 40 - 14 + 10
    zc.compact(1000)
    for i in range(40):
        want = None if i % 3 == 0 else pages[i]
        assert zc.get(pool, (1, 0, 0), i) == want
    assert zc.read_run(pool, (2, 0, 0), 0, 10) == (b"".join(pages[10:20]), [])


def test_put_run_stops_at_a_refused_page() -> None:
    zc = Zcache("1MiB", prefault=False)  # no huge pages: noise is refused
    pool = zc.new_pool(persistent=True)
    good = b"tmem page " * 409 + b"xxxxxx"
    data = good + os.urandom(PAGE) + good
    assert zc.put_run(pool, (0, 0, 0), 0, data) == 1
    assert zc.last_refusal is PutResult.POOR_COMPRESSION
    assert zc.put_run(pool, (0, 0, 0), 2, data[2 * PAGE :]) == 1


def test_run_bad_input() -> None:
    zc = Zcache("1MiB", prefault=False)
    pool = zc.new_pool(persistent=True)
    eph = zc.new_pool()
    with pytest.raises(PageSizeError):
        zc.put_run(pool, (0, 0, 0), 0, b"x" * 5000)
    with pytest.raises(PageSizeError):
        zc.put(pool, (0, 0, 0), 0, "x" * PAGE)
    with pytest.raises(TmemError):
        zc.read_run(eph, (0, 0, 0), 0, 1)
    with pytest.raises(TmemError):
        zc.read_run(pool, (0, 0, 0), -1, 1)
    with pytest.raises(TmemError):
        zc.read_run(pool, (0, 0, 0), 0, -1)
    with pytest.raises(TmemError):
        zc.read_run(pool, "nope", 0, 1)
    assert zc.frames_used == 0


def test_bad_page_types_lose_no_frame_when_staging() -> None:
    zc = Zcache("1MiB", compress_behind=True, prefault=False)
    pool = zc.new_pool(persistent=True)
    free = zc.frames_free
    for bad in ("x" * PAGE, [0] * PAGE, memoryview(bytes(2 * PAGE)).cast("H")):
        with pytest.raises(PageSizeError):
            zc.put(pool, (0, 0, 0), 0, bad)
    assert zc.frames_free == free


def test_read_run_raises_for_a_remote_page(anon_pages: list[bytes]) -> None:
    zc = Zcache("1MiB", prefault=False)
    pool = zc.new_pool(persistent=True)
    zc.put(pool, (0, 0, 0), 0, anon_pages[0])
    zc.install_remote(pool, (0, 0, 0), 1, ("peer", 1))
    with pytest.raises(RemotePageError):
        zc.read_run(pool, (0, 0, 0), 0, 2)


def test_same_filled_pages_in_a_run_are_stored_as_patterns(anon_pages: list[bytes]) -> None:
    """Zero and other same-filled pages in a staged run: with the C helper they never take
    a frame (found while staging), without it compaction finds them; same result."""
    from tmem.compress import find_fills

    zc = Zcache("2MiB", compress_behind=True, prefault=False)
    pool = zc.new_pool(persistent=True)
    fill = b"\x07" * PAGE
    run = [bytes(PAGE), anon_pages[1], anon_pages[2], fill, anon_pages[3], bytes(PAGE)]
    zc.put(pool, (3, 0, 0), 3, anon_pages[4])  # staged, then overwritten by a zero page
    assert zc.put_run(pool, (3, 0, 0), 0, b"".join(run)) == 6
    assert zc.put(pool, (3, 0, 0), 9, memoryview(fill))
    if find_fills is not None:
        assert zc.staged_pages == 3  # anon_pages[1..3]: the rest never took a frame
    zc.compact(100)
    assert zc.staged_pages == 0 and zc.stats()["same_filled_pages"] == 4
    assert zc.read_run(pool, (3, 0, 0), 0, 6) == (b"".join(run), [])
    assert zc.get(pool, (3, 0, 0), 9) == fill
