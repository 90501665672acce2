"""Hypothesis state machine: Zcache against a plain dict model.

Invariants checked after every step:
* an accepted persistent page is returned byte-identical until flushed (or replaced),
  or, once written back, is what the writeback target was given;
* an ephemeral get returns the page last put under that handle or None, never another
  page's data, and a hit removes it;
* no frame of the budget is held twice, every stored page is mapped by exactly its tmem
  entry and sits on its LRU (``Zcache.check_frames`` walks the structures themselves);
* counters agree with what is stored.

Runs differ in allocator (zsmalloc, zbud), budget (8 frames: constant reclaim; 24),
huge pages, writeback (none, a
target that takes every page, one that refuses them) and compress-behind. Half the runs
use compress-behind: persistent puts are staged raw and compressed by
``compact()`` (a rule here) or by a put that needs the frame.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tmem import Zcache
from tmem.pagetable import P_LIVE, P_STAGED
from tmem.zbud import EPH, PERS

PAGE = 4096


def make_page(kind: int, seed: int) -> bytes:
    """Pages of very different compressibility, all distinct per (kind, seed)."""
    rng = random.Random(kind * 1_000_003 + seed)
    tag = f"{kind}:{seed}:".encode()
    if kind == 0:
        return bytes(PAGE)  # zero page
    if kind == 1:
        return (tag * PAGE)[:PAGE]  # very compressible
    if kind == 2:
        words = [rng.randbytes(rng.randint(2, 6)) for _ in range(40)]
        out = bytearray(tag)
        while len(out) < PAGE:
            out += rng.choice(words)
        return bytes(out[:PAGE])  # medium
    if kind == 3:
        half = rng.randbytes(PAGE // 2 - len(tag))
        return tag + half + bytes(PAGE // 2)  # about half compressible
    return rng.randbytes(PAGE)  # incompressible: rejected


pages = st.builds(make_page, st.integers(0, 4), st.integers(0, 50))
oids = st.sampled_from([(0, 0, 0), (1, 0, 0), (0, 7, 9)])
indexes = st.integers(0, 12)
Key = tuple[tuple[int, int, int], int]


class ZcacheMachine(RuleBasedStateMachine):
    @initialize(
        frames=st.sampled_from([8, 24]),
        huge=st.booleans(),
        behind=st.booleans(),
        writeback=st.sampled_from([None, True, False]),
        allocator=st.sampled_from(["zsmalloc", "zbud"]),
    )
    def setup(
        self, frames: int, huge: bool, behind: bool, writeback: bool | None, allocator: str
    ) -> None:
        # 8 frames: puts keep reclaiming (eviction, writeback, failed puts); 24: room to
        # stage and to pair zbuds
        # writeback: None = no target; True = this machine takes every page; False = it
        # refuses them all (the zombie frame must go back to the LRU)
        self.accept_writeback = bool(writeback)
        self.zc = Zcache(
            memory=frames * PAGE,
            huge_pages=huge,
            compress_behind=behind,
            writeback=None if writeback is None else self,
            allocator=allocator,
        )
        self.zc.stage_reserve = frames // 3  # stage most of the small budget
        self.eph = self.zc.new_pool()
        self.pers = self.zc.new_pool(persistent=True)
        # the latest accepted page per handle: in zcache, or else in self.spilled
        self.pers_model: dict[Key, bytes] = {}
        self.eph_model: dict[Key, bytes] = {}
        self.spilled: dict[Key, bytes] = {}  # what the writeback target took, latest first
        self.written_back = 0
        self.run: dict[Key, bytes] = {}  # the pages of a put_run in progress

    def write_back(self, pool_id: int, oid: tuple[int, int, int], index: int, page: bytes) -> bool:
        """The writeback target: zcache hands over a page it holds under a handle."""
        assert pool_id == self.pers
        assert page in (self.pers_model.get((oid, index)), self.run.get((oid, index)))
        if not self.accept_writeback:
            return False
        self.spilled[(oid, index)] = page  # zcache drops its copy; the page lives here now
        self.written_back += 1
        return True

    def expect_spilled(self, key: Key) -> None:
        """zcache has no copy of ``key``: then its latest page must be in the spill."""
        assert self.spilled.get(key) == self.pers_model[key]

    @rule(oid=oids, index=indexes, page=pages)
    def put_persistent(self, oid: tuple[int, int, int], index: int, page: bytes) -> None:
        if self.zc.put(self.pers, oid, index, page):
            self.pers_model[(oid, index)] = page
        else:
            self.pers_model.pop((oid, index), None)

    @rule(oid=oids, index=indexes, page=pages)
    def put_ephemeral(self, oid: tuple[int, int, int], index: int, page: bytes) -> None:
        if self.zc.put(self.eph, oid, index, page):
            self.eph_model[(oid, index)] = page
        else:
            self.eph_model.pop((oid, index), None)

    @rule(oid=oids, first=indexes, run=st.lists(pages, min_size=1, max_size=8))
    def put_run_persistent(self, oid: tuple[int, int, int], first: int, run: list[bytes]) -> None:
        self.run = {(oid, first + i): page for i, page in enumerate(run)}
        stored = self.zc.put_run(self.pers, oid, first, b"".join(run))
        self.run = {}
        assert 0 <= stored <= len(run)
        for i in range(stored):
            self.pers_model[(oid, first + i)] = run[i]
        if stored < len(run):  # the first refused page: no stale copy; the rest not tried
            self.pers_model.pop((oid, first + stored), None)

    @rule(items=st.lists(st.tuples(oids, indexes, pages), min_size=1, max_size=8))
    def put_many_ephemeral(self, items: list[tuple[tuple[int, int, int], int, bytes]]) -> None:
        results = self.zc.put_many(self.eph, items)
        assert len(results) == len(items)
        for (oid, index, page), ok in zip(items, results, strict=True):
            if ok:
                self.eph_model[(oid, index)] = page
            else:
                self.eph_model.pop((oid, index), None)

    @rule(oid=oids, index=indexes, free=st.sampled_from([None, False, True]))
    def get_persistent(self, oid: tuple[int, int, int], index: int, free: bool | None) -> None:
        got = self.zc.get(self.pers, oid, index, free)
        if got is None and (oid, index) in self.pers_model:
            self.expect_spilled((oid, index))
        else:
            assert got == self.pers_model.get((oid, index))
            if free:
                self.pers_model.pop((oid, index), None)

    @rule(oid=oids, index=indexes)
    def get_ephemeral(self, oid: tuple[int, int, int], index: int) -> None:
        got = self.zc.get(self.eph, oid, index)
        expected = self.eph_model.pop((oid, index), None)
        assert got is None or got == expected  # a miss is allowed, wrong data never

    @rule(oid=oids, index=indexes, persistent=st.booleans())
    def flush_page(self, oid: tuple[int, int, int], index: int, persistent: bool) -> None:
        pool, model = (self.pers, self.pers_model) if persistent else (self.eph, self.eph_model)
        found = self.zc.flush_page(pool, oid, index)
        had = (oid, index) in model
        if persistent:
            if had and not found:
                self.expect_spilled((oid, index))
            assert not found or had
            model.pop((oid, index), None)
        else:
            model.pop((oid, index), None)
            assert not found or had

    @rule(oid=oids, persistent=st.booleans())
    def flush_object(self, oid: tuple[int, int, int], persistent: bool) -> None:
        pool, model = (self.pers, self.pers_model) if persistent else (self.eph, self.eph_model)
        keys = [k for k in model if k[0] == oid]
        local = [k for k in keys if self.zc.lookup(pool, *k) is not None]
        count = self.zc.flush_object(pool, oid)
        if persistent:
            assert count == len(local)
            for k in set(keys) - set(local):
                self.expect_spilled(k)
        for k in keys:
            del model[k]

    @rule(persistent=st.booleans())
    def zombify_then_unzombify(self, persistent: bool) -> None:
        model = self.pers_model if persistent else self.eph_model
        zombies = self.zc.zombify_lru(persistent)
        if self.zc.allocator.name == "zbud":
            assert len({zp.pampd >> 1 for zp in zombies}) <= 1  # one frame at a time
        else:  # LRU pages, about a frame's worth
            assert sum(len(zp.data) for zp in zombies[:-1]) < 4096
        for zp in zombies:
            page = self.zc.decompress(zp.data) if zp.compressed else zp.data
            assert page == model.get((zp.oid, zp.index))
        for zp in zombies:
            self.zc.unzombify(zp)

    @rule(frames=st.integers(1, 4))
    def evict_ephemeral(self, frames: int) -> None:
        free = self.zc.frames_free
        done = self.zc.evict_ephemeral(frames)
        assert 0 <= done <= frames
        assert self.zc.frames_free == free + done  # each evicted frame is free again

    @rule(max_pages=st.integers(1, 8))
    def compact(self, max_pages: int) -> None:
        before = self.zc.staged_pages
        done = self.zc.compact(max_pages)
        assert done <= max_pages
        assert self.zc.staged_pages == before - done

    @invariant()
    def persistent_pages_are_intact(self) -> None:
        if not hasattr(self, "zc"):
            return
        for (oid, index), page in self.pers_model.items():
            got = self.zc.get(self.pers, oid, index)
            if got is None:
                self.expect_spilled((oid, index))
            else:
                assert got == page

    @invariant()
    def budget_and_counters(self) -> None:
        if not hasattr(self, "zc"):
            return
        zc = self.zc
        assert zc.check_frames() == []
        stats = zc.stats()
        held = zc.allocator.frames_held()
        assert len(held) == zc.frames_used
        if zc.allocator.name == "zbud":  # the counters agree with the frame table
            zb = zc.allocator.counters
            for cls in (EPH, PERS):
                kinds = [k for f, k in held.items() if zc.allocator.cls[f] == cls]
                assert zb[cls].pageframes == len(kinds)
                assert zb[cls].buddied_count == kinds.count("buddied")
                assert zb[cls].unbuddied_count == kinds.count("unbuddied")
                assert zb[cls].zombie_count == kinds.count("zombie") == 0  # unzombified
            assert zb[PERS].zpages <= 2 * zb[PERS].pageframes
        assert stats["zombie_pages"] == 0
        local = sum(zc.lookup(self.pers, *k) is not None for k in self.pers_model)
        assert local == zc.pool_pages(self.pers)  # zcache holds no page the model lacks
        assert stats["pers_zpages"] == local
        if zc.writeback is None:
            assert local == len(self.pers_model)
        assert stats["writtenback_pages"] == self.written_back
        assert stats["eph_zpages"] <= len(self.eph_model)
        stored_pages = sum(pool.page_count() for pool in zc.tmem.pools())
        assert stored_pages == stats["stored_pages"]
        flags = zc.pages.flags
        both = P_LIVE | P_STAGED
        staged = sum(1 for h in range(zc.pages.cap) if flags[h] & both == both)
        assert stats["staged_pages"] == staged == zc.staged_pages


TestZcacheStateful = ZcacheMachine.TestCase
TestZcacheStateful.settings = settings(
    max_examples=60,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
