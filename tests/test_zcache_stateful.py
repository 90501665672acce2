"""Hypothesis state machine: Zcache against a plain dict model.

Invariants checked after every step:
* an accepted persistent page is returned byte-identical until flushed (or replaced);
* an ephemeral get returns the page last put under that handle or None, never another
  page's data, and a hit removes it;
* the frame budget is never exceeded;
* counters agree with what is stored.

Half the runs use compress-behind: persistent puts are staged raw and compressed by
``compact()`` (a rule here) or by a put that needs the frame.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tmem import Zcache
from tmem.zbud import EPH, F_STAGED, PERS

PAGE = 4096
BUDGET_FRAMES = 24


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


class ZcacheMachine(RuleBasedStateMachine):
    @initialize(huge=st.booleans(), behind=st.booleans())
    def setup(self, huge: bool, behind: bool) -> None:
        self.zc = Zcache(memory=BUDGET_FRAMES * PAGE, huge_pages=huge, compress_behind=behind)
        self.zc.stage_reserve = 8  # stage most of the small budget
        self.eph = self.zc.new_pool()
        self.pers = self.zc.new_pool(persistent=True)
        self.pers_model: dict[tuple[tuple[int, int, int], int], bytes] = {}
        self.eph_model: dict[tuple[tuple[int, int, int], int], bytes] = {}

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

    @rule(oid=oids, index=indexes, free=st.sampled_from([None, False, True]))
    def get_persistent(self, oid: tuple[int, int, int], index: int, free: bool | None) -> None:
        got = self.zc.get(self.pers, oid, index, free)
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
        had = model.pop((oid, index), None) is not None
        if persistent:
            assert found == had
        else:
            assert not found or had

    @rule(oid=oids, persistent=st.booleans())
    def flush_object(self, oid: tuple[int, int, int], persistent: bool) -> None:
        pool, model = (self.pers, self.pers_model) if persistent else (self.eph, self.eph_model)
        count = self.zc.flush_object(pool, oid)
        keys = [k for k in model if k[0] == oid]
        for k in keys:
            del model[k]
        if persistent:
            assert count == len(keys)

    @rule(persistent=st.booleans())
    def zombify_then_unzombify(self, persistent: bool) -> None:
        model = self.pers_model if persistent else self.eph_model
        zombies = self.zc.zombify_lru(persistent)
        assert len({zp.pampd >> 1 for zp in zombies}) <= 1  # one frame at a time
        for zp in zombies:
            page = self.zc.decompress(zp.data) if zp.compressed else zp.data
            assert page == model.get((zp.oid, zp.index))
        for zp in zombies:
            self.zc.unzombify(zp)

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
            assert self.zc.get(self.pers, oid, index) == page

    @invariant()
    def budget_and_counters(self) -> None:
        if not hasattr(self, "zc"):
            return
        zc = self.zc
        assert zc.frames_used <= BUDGET_FRAMES
        stats = zc.stats()
        zb = zc.zbud.counters
        assert stats["pers_zpages"] == len(self.pers_model)
        assert stats["eph_zpages"] <= len(self.eph_model)
        assert zb[EPH].pageframes + zb[PERS].pageframes == zc.frames_used
        assert zb[PERS].zpages <= 2 * zb[PERS].pageframes
        assert zb[EPH].buddied_count >= 0 and zb[EPH].unbuddied_count >= 0
        stored_pages = sum(len(p) for pool in zc.tmem.pools() for p in pool.objects.values())
        assert stored_pages == stats["stored_pages"]
        staged = sum(1 for f in range(BUDGET_FRAMES) if zc.zbud.flags[f] & F_STAGED)
        assert stats["staged_pages"] == staged == zc.staged_pages


TestZcacheStateful = ZcacheMachine.TestCase
TestZcacheStateful.settings = settings(
    max_examples=60,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
