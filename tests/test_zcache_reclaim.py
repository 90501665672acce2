"""Ouroboros reclaim, writeback, zombie hand-out and remote pampds."""

from __future__ import annotations

import pytest

from tmem import PutResult, RemotePageError, Zcache
from tmem.tmem_core import Oid
from tmem.zbud import EPH

PAGE = 4096


def test_ouroboros_persistent_outranks_ephemeral(
    anon_pages: list[bytes], file_pages: list[bytes]
) -> None:
    frames = 64
    zc = Zcache(allocator="zbud", memory=frames * PAGE)
    eph = zc.new_pool()
    pers = zc.new_pool(persistent=True)
    accepted = sum(zc.put(eph, (1, 0, 0), i, page) for i, page in enumerate(file_pages[:400]))
    assert zc.frames_free == 0
    stats = zc.stats()
    # at most two zbuds a frame: the rest of the accepted pages were evicted, and counted
    assert stats["zbud_eph_zpages"] <= 2 * frames < accepted
    assert stats["eph_zpages"] + stats["evicted_eph_zpages"] == accepted
    # ephemeral puts recycled their own LRU tail: every evicted frame went to one of them
    assert stats["eph_ate_tail"] == stats["evicted_eph_pageframes"] >= 1
    stored = {i: p for i, p in enumerate(anon_pages[:200]) if zc.put(pers, (2, 0, 0), i, p)}
    stats = zc.stats()
    assert len(stored) >= 100  # room was made by evicting cache pages
    # no frame was free: each persistent frame is an ephemeral frame it ate (and the
    # budget's frames charged to metadata as the index grew were eaten too)
    charged = stats["frames_total"] - stats["frames_limit"]
    assert 0 <= stats["pers_ate_eph"] - stats["zbud_pers_pageframes"] <= charged
    # 200 pages outgrow 64 frames; a persistent put fails only once no ephemeral frame
    # is left to eat
    assert stats["pers_ate_eph_failed"] == stats["failed_pers_puts"] >= 1
    assert stats["zbud_eph_pageframes"] == 0
    for i, page in stored.items():
        assert zc.get(pers, (2, 0, 0), i) == page
    assert zc.check_frames() == []


def test_persistent_puts_never_evict_persistent_data(anon_pages: list[bytes]) -> None:
    zc = Zcache(allocator="zbud", memory=32 * PAGE)
    pers = zc.new_pool(persistent=True)
    status = {i: zc.put_status(pers, (0, 0, 0), i, p) for i, p in enumerate(anon_pages[:300])}
    stored = {i: anon_pages[i] for i, s in status.items() if s is PutResult.STORED}
    no_memory = sum(s is PutResult.NO_MEMORY for s in status.values())
    stats = zc.stats()
    # 32 frames hold at most 64 zbuds: the other pages that compress were refused
    assert len(stored) - stats["same_filled_pages"] <= 2 * 32
    assert no_memory >= 1
    assert stats["failed_pers_puts"] == stats["pers_ate_eph_failed"] == no_memory
    for i, page in stored.items():
        assert zc.get(pers, (0, 0, 0), i) == page
    assert zc.check_frames() == []


def test_evicts_least_recently_used_ephemeral_frame() -> None:
    import random

    zc = Zcache(allocator="zbud", memory=6 * PAGE)
    eph = zc.new_pool()
    rng = random.Random(3)
    big = [rng.randbytes(2800) + bytes(PAGE - 2800) for _ in range(12)]  # one per frame
    n = 0
    while zc.stats()["evicted_eph_pageframes"] == 0:  # fill until the first eviction
        assert zc.put(eph, (0, 0, 0), n, big[n])
        n += 1
    evicted = zc.stats()["evicted_eph_pageframes"]  # 2 if metadata took a frame too
    assert n >= 3 and 1 <= evicted <= 2
    for i in range(evicted):  # the LRU frames: the oldest pages
        assert zc.get(eph, (0, 0, 0), i) is None
    for i in range(evicted, n):
        assert zc.get(eph, (0, 0, 0), i) == big[i]


def test_prealloc_fix_uses_partial_frames_when_budget_is_full(anon_pages: list[bytes]) -> None:
    zc = Zcache(allocator="zbud", memory=1 * PAGE)
    pers = zc.new_pool(persistent=True)
    small = [p for p in anon_pages if len(zc.compressor.compress(p)) < 1500][:2]
    assert zc.put(pers, (0, 0, 0), 0, small[0])
    assert zc.frames_free == 0
    # no free frame, but the partial frame has room: the put must not fail
    assert zc.put(pers, (0, 0, 0), 1, small[1])
    assert zc.stats()["failed_getfreepages"] == 0


class DictBacking:
    def __init__(self, fail: bool = False) -> None:
        self.pages: dict[tuple[Oid, int], bytes] = {}
        self.fail = fail

    def write_back(self, pool_id: int, oid: Oid, index: int, page: bytes) -> bool:
        if self.fail:
            return False
        self.pages[(oid, index)] = page
        return True


def test_writeback_moves_lru_persistent_pages_out(anon_pages: list[bytes]) -> None:
    backing = DictBacking()
    zc = Zcache(allocator="zbud", memory=16 * PAGE, writeback=backing)
    pers = zc.new_pool(persistent=True)
    written = {i: p for i, p in enumerate(anon_pages[:200]) if zc.put(pers, (0, 0, 0), i, p)}
    assert len(written) >= 150  # only poorly compressible pages are refused
    assert zc.stats()["writtenback_pages"] == len(backing.pages) > 100
    # the newest pages are in RAM, the oldest went to the backing store
    assert zc.get(pers, (0, 0, 0), max(written)) == written[max(written)]
    assert ((0, 0, 0), min(written)) in backing.pages
    for i, page in written.items():
        got = zc.get(pers, (0, 0, 0), i)
        assert (got if got is not None else backing.pages[((0, 0, 0), i)]) == page


def test_failed_writeback_keeps_pages(anon_pages: list[bytes]) -> None:
    zc = Zcache(allocator="zbud", memory=8 * PAGE, writeback=DictBacking(fail=True))
    pers = zc.new_pool(persistent=True)
    status = {i: zc.put_status(pers, (0, 0, 0), i, p) for i, p in enumerate(anon_pages[:100])}
    stored = {i: anon_pages[i] for i, s in status.items() if s is PutResult.STORED}
    no_memory = sum(s is PutResult.NO_MEMORY for s in status.values())
    assert len(stored) - zc.stats()["same_filled_pages"] <= 2 * 8 and no_memory >= 1
    # each put that found no frame offered at least one LRU page, and it was refused
    assert zc.stats()["writeback_failed"] >= no_memory
    assert zc.stats()["writtenback_pages"] == 0
    for i, page in stored.items():
        assert zc.get(pers, (0, 0, 0), i) == page
    assert zc.allocator.counters[1].zombie_count == 0


def test_huge_pages_kept_raw(anon_pages: list[bytes]) -> None:
    import random

    zc = Zcache(allocator="zbud", memory=8 * PAGE, huge_pages=True)
    pers = zc.new_pool(persistent=True)
    noise = random.Random(5).randbytes(PAGE)
    assert zc.put(pers, (0, 0, 0), 0, noise)
    assert zc.get(pers, (0, 0, 0), 0) == noise
    assert zc.stats()["huge_pages"] == 1
    assert zc.frames_used == 1
    assert zc.flush_page(pers, (0, 0, 0), 0)
    assert zc.stats()["huge_pages"] == 0  # current count; huge_pages_stored is cumulative
    assert zc.stats()["huge_pages_stored"] == 1
    assert zc.frames_used == 0


def test_zombify_replace_with_remote_and_hooks(anon_pages: list[bytes]) -> None:
    freed: list[tuple[int, int, Oid | None, int, object]] = []

    class Hooks:
        def on_free(
            self, client: int, pool_id: int, oid: Oid | None, index: int, pampd: object
        ) -> None:
            freed.append((client, pool_id, oid, index, pampd))

    zc = Zcache(allocator="zbud", memory=16 * PAGE)
    zc.remote_hooks = Hooks()
    pers = zc.new_pool(persistent=True)
    for i in range(6):
        assert zc.put(pers, (4, 0, 0), i, anon_pages[i])
    zombies = zc.zombify_lru(True)
    assert zombies and all(z.persistent for z in zombies)
    for z in zombies:
        assert zc.decompress(z.data) == anon_pages[z.index]
        assert zc.get(pers, z.oid, z.index) == anon_pages[z.index]  # still readable
        assert zc.replace(pers, z.oid, z.index, ("node", 2), expected=z)
    assert zc.stats()["remote_pers_pages"] == len(zombies)
    with pytest.raises(RemotePageError) as info:
        zc.get(pers, zombies[0].oid, zombies[0].index)
    assert info.value.pampd == ("node", 2)
    # a newer put replaces the remote copy: the owner is told to flush it
    assert zc.put(pers, zombies[0].oid, zombies[0].index, anon_pages[50])
    assert freed[-1][3] == zombies[0].index
    assert zc.flush_object(pers, (4, 0, 0)) == 6
    assert zc.stats()["remote_pers_pages"] == 0
    assert zc.frames_used == 0


def test_replace_refuses_when_a_newer_put_won(anon_pages: list[bytes]) -> None:
    zc = Zcache(allocator="zbud", memory=16 * PAGE)
    pers = zc.new_pool(persistent=True)
    zc.put(pers, (0, 0, 0), 0, anon_pages[0])
    (zombie,) = zc.zombify_lru(True)
    assert zc.put(pers, (0, 0, 0), 0, anon_pages[1])  # newer data while "in flight"
    assert not zc.replace(pers, (0, 0, 0), 0, ("node", 1), expected=zombie)
    assert zc.get(pers, (0, 0, 0), 0) == anon_pages[1]


def test_foreign_client_pools_and_raw_puts(anon_pages: list[bytes]) -> None:
    zc = Zcache(allocator="zbud", memory=16 * PAGE)
    pool = zc.new_pool(persistent=True, client=3, pool_id=5)
    data = zc.compressor.compress(anon_pages[0])
    assert zc.put_compressed(5, (1, 1, 1), 9, data, client=3) == 0
    assert zc.get(5, (1, 1, 1), 9, client=3) == anon_pages[0]
    got = zc.get_compressed(5, (1, 1, 1), 9, free=True, client=3)
    assert got == (data, True)
    assert zc.get(5, (1, 1, 1), 9, client=3) is None
    assert pool == 5
    assert zc.allocator.counters[EPH].pageframes == 0


def test_evict_ephemeral_shrinks_cache_only(
    anon_pages: list[bytes], file_pages: list[bytes]
) -> None:
    zc = Zcache(allocator="zbud", memory=64 * PAGE)
    eph = zc.new_pool()
    pers = zc.new_pool(persistent=True)
    stored = set()
    for i in range(40):
        zc.put(eph, (1, 0, 0), i, file_pages[i])
        if zc.put(pers, (2, 0, 0), i, anon_pages[i]):
            stored.add(i)
    eph_frames = zc.allocator.counters[EPH].pageframes
    free_before = zc.frames_free
    assert zc.evict_ephemeral(3) == 3
    assert zc.allocator.counters[EPH].pageframes == eph_frames - 3
    assert zc.frames_free == free_before + 3
    assert zc.evict_ephemeral(10_000) == eph_frames - 3  # stops when no cache is left
    assert zc.stats()["eph_zpages"] == 0
    assert all(zc.get(pers, (2, 0, 0), i) == anon_pages[i] for i in stored)  # untouched
    assert zc.stats()["pers_zpages"] == len(stored)
