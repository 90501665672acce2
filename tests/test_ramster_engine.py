"""PageEngine logic with in-process peers (the unit-test stand-in for the transport)."""

from __future__ import annotations

import asyncio
import random

import pytest

from tmem.ramster.policy import LeastLoaded, Manual, TargetPolicy
from tmem.ramster.remotify import Blob, Key, PageEngine, PeerError, PutStatus
from tmem.zcache import Oid, Zcache

OID: Oid = (1, 2, 3)


class Fabric:
    """Routes PeerClient calls between engines; nodes can be taken down."""

    def __init__(self) -> None:
        self.engines: dict[int, PageEngine] = {}
        self.down: set[int] = set()
        self.gate: asyncio.Event | None = None
        self.log: list[tuple[str, int, int, object]] = []

    def peer(self, me: int) -> FakePeers:
        return FakePeers(self, me)

    def live(self, me: int) -> dict[int, int]:
        return {n: e.room() for n, e in self.engines.items() if n != me and n not in self.down}


class FakePeers:
    def __init__(self, fabric: Fabric, me: int) -> None:
        self.f, self.me = fabric, me

    def _check(self, node: int) -> PageEngine:
        if node in self.f.down:
            raise PeerError(f"node {node} down")
        return self.f.engines[node]

    async def put_pages(
        self, node: int, persistent: bool, items: list[tuple[Key, bytes, bool]]
    ) -> list[int]:
        eng = self._check(node)
        if self.f.gate is not None:
            await self.f.gate.wait()
        self.f.log += [("put", self.me, node, k) for k, _d, _c in items]
        return eng.store_foreign(self.me, persistent, items)

    async def get_pages(self, node: int, keys: list[Key], free: bool) -> list[Blob | None]:
        return self._check(node).get_foreign(self.me, keys, free)

    async def flush_pages(self, node: int, keys: list[Key]) -> None:
        self.f.log += [("flush", self.me, node, k) for k in keys]
        self._check(node).flush_foreign(self.me, keys)

    async def flush_objects(self, node: int, objs: list[tuple[int, Oid]]) -> None:
        self._check(node).flush_foreign_objects(self.me, objs)

    async def destroy_pools(self, node: int, pools: list[int]) -> None:
        self._check(node).destroy_foreign_pools(self.me, pools)


def foreign(eng: PageEngine, client: int, key: Key) -> bytes | None:
    """A foreign page as its owner would see it (decompressed)."""
    got = eng.get_foreign(client, [key], False)[0]
    if got is None:
        return None
    return eng.zc.decompress(got[0]) if got[1] else got[0]


def make(
    fabric: Fabric,
    n: int,
    memory: str,
    replicas: int = 2,
    policy: TargetPolicy | None = None,
    allocator: str = "zsmalloc",
) -> PageEngine:
    eng = PageEngine(
        Zcache(memory, allocator=allocator),
        node_number=n,
        peers=fabric.peer(n),
        policy=policy or LeastLoaded(),
        live_peers=lambda: fabric.live(n),
        replicas=replicas,
        batch=32,
    )
    fabric.engines[n] = eng
    return eng


def pages(n: int, seed: int = 0) -> list[bytes]:
    """Half-random pages (~2070 B compressed): a node keeps fewer than two a frame."""
    rng = random.Random(seed)
    return [rng.randbytes(2048) + bytes(2048) for _ in range(n)]


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_full_node_holds_writes_and_remotifies_to_two_replicas() -> None:
    async def main() -> None:
        f = Fabric()
        a, b, c = make(f, 1, "256KiB"), make(f, 2, "4MiB"), make(f, 3, "4MiB")
        pool = a.new_pool(persistent=True)
        ps = pages(300)
        for i, p in enumerate(ps):
            assert await a.put(pool, OID, i, p)
        assert a.c.writes_held >= 1
        # each page once, local or remote; 64 frames keep fewer than 128 of them
        remote = a.c.remote_pers_pages
        assert a.zc.stats()["pers_zpages"] + remote == len(ps)
        assert remote >= len(ps) - 2 * a.zc.frames_total
        assert b.stats()["foreign_pers_pages"] == c.stats()["foreign_pers_pages"] == remote
        for i, p in enumerate(ps):
            assert await a.get(pool, OID, i) == p
        assert a.c.remote_pers_pages_succ_get == remote  # one peer read per remote page

    run(main())


def test_flush_is_never_overtaken_by_a_later_put_of_the_same_handle() -> None:
    async def main() -> None:
        f = Fabric()
        a, b = make(f, 1, "1MiB", replicas=1), make(f, 2, "4MiB", replicas=1)
        pool = a.new_pool(persistent=True)
        old, new = pages(2, seed=5)
        assert await a.put(pool, OID, 0, old)
        assert await a.remotify_once() == 1
        assert foreign(b, 1, (pool, OID, 0)) == old
        assert a.flush_page(pool, OID, 0)  # queued, not yet sent
        assert await a.put(pool, OID, 0, new)
        assert await a.remotify_once() == 1  # drains the flush first, then puts
        ops = [(op, k) for op, _me, _n, k in f.log if k == (pool, OID, 0)]
        assert ops == [("put", (pool, OID, 0)), ("flush", (pool, OID, 0)), ("put", (pool, OID, 0))]
        assert foreign(b, 1, (pool, OID, 0)) == new
        assert await a.get(pool, OID, 0) == new

    run(main())


def test_put_during_inflight_remotify_wins_and_stale_copy_is_flushed() -> None:
    async def main() -> None:
        f = Fabric()
        a, b = make(f, 1, "1MiB", replicas=1), make(f, 2, "4MiB", replicas=1)
        pool = a.new_pool(persistent=True)
        old, new = pages(2, seed=6)
        assert await a.put(pool, OID, 0, old)
        f.gate = asyncio.Event()
        task = asyncio.create_task(a.remotify_once())
        await asyncio.sleep(0)
        assert await a.put(pool, OID, 0, new)  # rewritten while in flight
        f.gate.set()
        assert await task == 0
        assert a.c.stale_remotify_discarded == 1
        assert await a.get(pool, OID, 0) == new
        await a.drain_flushes()
        assert foreign(b, 1, (pool, OID, 0)) is None
        assert b.stats()["foreign_pers_pages"] == 0

    run(main())


def test_node_death_rereplicates_and_loses_nothing() -> None:
    async def main() -> None:
        f = Fabric()
        a = make(f, 1, "256KiB")
        peers = [make(f, n, "4MiB") for n in (2, 3, 4)]
        pool = a.new_pool(persistent=True)
        ps = pages(200, seed=7)
        for i, p in enumerate(ps):
            assert await a.put(pool, OID, i, p)
        remote = a.c.remote_pers_pages
        assert remote >= len(ps) - 2 * a.zc.frames_total  # 64 frames, < 2 pages each
        victim_engine = max(peers, key=lambda e: e.stats()["foreign_pers_pages"])
        victim = victim_engine.node_number
        on_victim = victim_engine.stats()["foreign_pers_pages"]
        f.down.add(victim)
        a.node_lost(victim, restarted=False)
        assert len(a.under) == on_victim >= 1  # each page copied there lost a replica
        while a.under:
            assert await a.rereplicate() > 0
        assert a.c.pers_pages_lost == 0
        assert all(len(e.nodes) == 2 and victim not in e.nodes for e in a.remote.values())
        for i, p in enumerate(ps):
            assert await a.get(pool, OID, i) == p

    run(main())


def test_full_receiver_refuses_and_sender_keeps_the_page() -> None:
    async def main() -> None:
        f = Fabric()
        a, b = make(f, 1, "64KiB", replicas=1), make(f, 2, "64KiB", replicas=1)
        pool = a.new_pool(persistent=True)
        ps = pages(64, seed=8)
        stored = [await a.put(pool, OID, i, p) for i, p in enumerate(ps)]
        assert not all(stored)  # both nodes full: the write is refused, not lost
        assert b.c.foreign_puts_refused > 0 or a.c.pers_pages_remote_failed > 0
        for i, p in enumerate(ps):
            assert await a.get(pool, OID, i) == (p if stored[i] else None)

    run(main())


def test_ephemeral_remote_page_of_a_dead_node_is_a_miss() -> None:
    async def main() -> None:
        f = Fabric()
        a, _b = make(f, 1, "1MiB", replicas=1), make(f, 2, "4MiB", replicas=1)
        pool = a.new_pool(persistent=False)
        p = pages(1, seed=9)[0]
        assert await a.put(pool, OID, 0, p)
        assert await a.remotify_once() == 1
        assert a.c.eph_pages_remoted == 1
        f.down.add(2)
        a.node_lost(2, restarted=False)
        assert await a.get(pool, OID, 0) is None
        assert a.c.eph_pages_lost == 1 and a.c.pers_pages_lost == 0

    run(main())


def test_foreign_requests_for_missing_pools_change_nothing() -> None:
    f = Fabric()
    b = make(f, 2, "1MiB")
    p = pages(1)[0]
    assert b.get_foreign(1, [(3, OID, 0)], False) == [None]
    assert b.flush_foreign(1, [(3, OID, 0)]) == 0
    assert b.flush_foreign_objects(1, [(3, OID)]) == 0
    assert b.destroy_foreign_pools(1, [3]) == 0
    assert b.store_foreign(1, True, [((3, OID, 0), p, False)]) == [PutStatus.STORED]
    # Same pool id claimed as ephemeral: refused, the stored page is untouched.
    assert b.store_foreign(1, False, [((3, OID, 0), p[::-1], False)]) == [PutStatus.BAD]
    assert b.store_foreign(1, True, [((3, OID, 1), b"short", False)]) == [PutStatus.BAD]
    assert b.store_foreign(1, True, [((3, OID, 1), bytes(5000), True)]) == [PutStatus.BAD]
    assert foreign(b, 1, (3, OID, 0)) == p
    assert foreign(b, 1, (3, OID, 1)) is None
    assert b.stats()["foreign_pers_pages"] == 1
    assert b.get_foreign(9, [(3, OID, 0)], False) == [None]  # other client: no access
    assert b.drop_foreign(1) == 1 and b.stats()["foreign_pers_pages"] == 0


def test_unknown_local_pool_is_a_clear_error() -> None:
    f = Fabric()
    a = make(f, 1, "1MiB")
    from tmem.errors import UnknownPoolError

    with pytest.raises(UnknownPoolError):
        run(a.put(5, OID, 0, bytes(4096)))
    with pytest.raises(UnknownPoolError):
        a.flush_page(5, OID, 0)


def test_repatriation_pulls_remote_pages_home_when_memory_frees() -> None:
    async def main() -> None:
        f = Fabric()
        a, b = make(f, 1, "256KiB", replicas=1), make(f, 2, "4MiB", replicas=1)
        pool = a.new_pool(persistent=True)
        keep = pages(120, seed=10)
        for i, p in enumerate(keep):
            assert await a.put(pool, OID, i, p)
        remote_before = a.c.remote_pers_pages
        assert remote_before >= max(1, len(keep) - 2 * a.zc.frames_total)
        local = [(pool, OID, i) for i in range(len(keep)) if (pool, OID, i) not in a.remote]
        for _pool, oid, index in local:  # free local memory
            assert a.flush_page(pool, oid, index)
        assert a.zc.frames_free > a.high_frames
        moved = await a.repatriate(limit=1000)
        assert moved >= 1 and a.c.pers_pages_repatriated == moved
        # it stops when every page is home or memory is down to the high mark again
        assert moved == remote_before or a.zc.frames_free <= a.high_frames
        assert a.c.remote_pers_pages == remote_before - moved
        await a.drain_flushes()
        assert b.stats()["foreign_pers_pages"] == a.c.remote_pers_pages
        gone = {k[2] for k in local}
        for i, p in enumerate(keep):
            assert await a.get(pool, OID, i) == (None if i in gone else p)

    run(main())


def test_flush_object_and_destroy_pool_reach_the_peers() -> None:
    async def main() -> None:
        f = Fabric()
        a, b = make(f, 1, "4MiB", replicas=1), make(f, 2, "4MiB", replicas=1)
        pool = a.new_pool(persistent=True)
        x, y = (1, 1, 1), (2, 2, 2)
        ps = pages(20, seed=12)
        for i, p in enumerate(ps):
            assert await a.put(pool, x if i < 10 else y, i, p)
        assert await a.remotify_once(100) == 20
        assert b.stats()["foreign_pers_pages"] == 20
        assert a.flush_object(pool, x) == 10
        await a.drain_flushes()
        assert b.stats()["foreign_pers_pages"] == 10
        assert a.c.remote_objects_flushed == 1
        assert await a.get(pool, x, 0) is None and await a.get(pool, y, 10) == ps[10]
        assert a.destroy_pool(pool) == 10
        await a.drain_flushes()
        assert b.stats()["foreign_pers_pages"] == 0 and not b.foreign
        assert a.c.remote_pers_pages == 0

    run(main())


@pytest.mark.parametrize("seed", range(int(__import__("os").environ.get("RAMSTER_SEEDS", "6"))))
def test_random_ops_and_single_node_failures_match_a_model(seed: int) -> None:
    """Random put/get/flush/exclusive-get/remotify/repatriate with one peer dying and
    coming back (restarted), checked against a dict: persistent pages never lost."""

    async def main() -> None:
        rng = random.Random(seed)
        f = Fabric()
        a = make(f, 1, "128KiB")
        peer_mem = "2MiB" if seed % 2 else "160KiB"  # odd seeds: peers fill up and refuse
        for n in (2, 3, 4):
            make(f, n, peer_mem)
        pool = a.new_pool(persistent=True)
        bank = pages(40, seed=100 + seed)
        model: dict[int, bytes] = {}
        dead: int | None = None
        for step in range(600):
            op = rng.random()
            i = rng.randrange(120)
            if op < 0.45:
                p = rng.choice(bank)
                if await a.put(pool, OID, i, p):
                    model[i] = p
                else:
                    model.pop(i, None)  # a failed put leaves no older copy
            elif op < 0.70:
                assert await a.get(pool, OID, i) == model.get(i), (step, i)
            elif op < 0.78:
                assert await a.get(pool, OID, i, True) == model.pop(i, None), (step, i)
            elif op < 0.86:
                assert a.flush_page(pool, OID, i) == (model.pop(i, None) is not None)
            elif op < 0.92:
                await a.remotify_once(rng.randrange(1, 40))
            elif op < 0.95:
                await a.rereplicate()
                await a.repatriate(8)
            elif dead is None:
                if a.under:  # one failure at a time: only once every page has 2 copies
                    continue
                dead = rng.choice([2, 3, 4])
                f.down.add(dead)
                a.node_lost(dead, restarted=False)
            else:
                # The dead node comes back empty (a restart): drop what it held.
                old = f.engines[dead]
                fresh = make(f, dead, peer_mem)
                assert fresh is not old
                f.down.discard(dead)
                a.node_lost(dead, restarted=True)
                dead = None
                while a.under and await a.rereplicate():
                    pass
        assert a.c.pers_pages_lost == 0
        for i in range(120):
            assert await a.get(pool, OID, i) == model.get(i), i
        await a.drain_flushes()  # gets may have repatriated pages (flushes queued)
        # Peers hold exactly the remote copies the owner knows about.
        held = sum(len(e.nodes) for e in a.remote.values())
        live = [e for n, e in f.engines.items() if n != 1 and n not in f.down]
        assert sum(e.stats()["foreign_pers_pages"] for e in live) == held
        s = a.stats()
        assert s["pers_pages_remoted"] > 0 and s["remote_pers_pages_succ_get"] > 0
        if seed % 2 == 0:
            assert sum(e.c.foreign_puts_refused for e in f.engines.values()) > 0

    run(main())


@pytest.mark.parametrize("allocator", ["zsmalloc", "zbud"])
def test_local_pages_sharing_frames_with_foreign_pages_are_still_remotified(
    allocator: str,
) -> None:
    async def main() -> None:
        f = Fabric()
        a = make(f, 1, "1MiB", replicas=1, allocator=allocator)
        b = make(f, 2, "1MiB", replicas=1, policy=Manual(1), allocator=allocator)
        c = make(f, 3, "4MiB", replicas=1, allocator=allocator)
        pa, pb = a.new_pool(persistent=True), b.new_pool(persistent=True)
        rng = random.Random(22)
        # ~1.3 KiB compressed: zbud pairs a's own page with b's foreign one in a frame
        own = [rng.randbytes(1200) + bytes(2896) for _ in range(60)]
        theirs = [rng.randbytes(1200) + bytes(2896) for _ in range(60)]
        for i in range(60):
            assert await a.put(pa, OID, i, own[i])
            assert await b.put(pb, OID, i, theirs[i])
            assert await b.remotify_once(1) == 1  # lands on a, next to a's own page
        assert a.stats()["foreign_pers_pages"] == 60
        # a's own pages and b's share frames (zbud: as buddies; zsmalloc: in spans)
        pt = a.zc.pages
        owners: dict[int, set[int]] = {}
        for h in pt.walk(1):
            obj = a.zc.tmem.obj(pt.obj[h])
            assert obj is not None
            start, _end = a.zc.allocator.span(h)
            owners.setdefault(start // 4096, set()).add(obj.pool.client)
        assert sum(len(clients) > 1 for clients in owners.values()) > 20
        moved = await a.remotify_once(60)
        assert moved == 60 and a.c.pers_pages_remoted == 60  # all of a's own pages
        assert c.stats()["foreign_pers_pages"] == 60
        assert a.stats()["foreign_pers_pages"] == 60  # b's pages stayed on a
        for i in range(60):
            assert await a.get(pa, OID, i) == own[i]
            assert await b.get(pb, OID, i) == theirs[i]

    run(main())


def test_front_end_hooks_make_room_and_fetch_remote() -> None:
    """A front end (the NBD device) owning its pool on the Zcache directly."""

    async def main() -> None:
        from tmem.errors import RemotePageError, UnknownPoolError

        f = Fabric()
        a = make(f, 1, "256KiB")
        make(f, 2, "4MiB")
        make(f, 3, "4MiB")
        zc = a.zc
        pool = zc.new_pool(persistent=True)
        with pytest.raises(UnknownPoolError):
            a.adopt_pool(pool, persistent=False)
        a.adopt_pool(pool, persistent=True)
        ps = pages(4 * zc.frames_total, seed=30)
        for i, p in enumerate(ps):
            assert await a.make_room(1)
            assert zc.put(pool, OID, i, p)
        assert a.c.pers_pages_remoted >= len(ps) - 2 * zc.frames_total  # < 2 a frame
        for i, p in enumerate(ps):
            try:
                got = zc.get(pool, OID, i)
            except RemotePageError as exc:
                got = await a.fetch_remote(pool, OID, i, exc.pampd)
            assert got == p
        # Storing a fetched page back replaces the remote pampd; its copies are flushed.
        assert await a.make_room(1)
        key = next(iter(a.remote))
        page = await a.fetch_remote(*key, a.remote[key])
        remote = a.c.remote_pers_pages
        assert zc.put(*key, page)
        assert a.c.remote_pers_pages == remote - 1 and key not in a.remote
        assert isinstance(zc.lookup(*key), int)
        await a.drain_flushes()
        held = sum(len(e.nodes) for e in a.remote.values())
        assert sum(f.engines[n].stats()["foreign_pers_pages"] for n in (2, 3)) == held

    run(main())


def test_unreachable_persistent_page_is_an_error_not_a_miss() -> None:
    async def main() -> None:
        f = Fabric()
        a, b = make(f, 1, "1MiB", replicas=1), make(f, 2, "4MiB", replicas=1)
        pool = a.new_pool(persistent=True)
        p = pages(1, seed=40)[0]
        assert await a.put(pool, OID, 0, p)
        assert await a.remotify_once() == 1
        f.down.add(2)  # unreachable, not yet declared dead
        with pytest.raises(PeerError):
            await a.get(pool, OID, 0)
        with pytest.raises(PeerError):
            await a.get(pool, OID, 0, True)
        f.down.discard(2)
        assert await a.get(pool, OID, 0, True) == p  # exclusive: read, then flushed
        assert await a.get(pool, OID, 0) is None
        await a.drain_flushes()
        assert b.stats()["foreign_pers_pages"] == 0

    run(main())


class FlakyPeers(FakePeers):
    """A live peer whose page or object flushes fail while named in ``failing``."""

    def __init__(self, fabric: Fabric, me: int) -> None:
        super().__init__(fabric, me)
        self.failing: set[str] = set()

    async def flush_pages(self, node: int, keys: list[Key]) -> None:
        if "pages" in self.failing:
            raise PeerError("flush lost")
        await super().flush_pages(node, keys)

    async def flush_objects(self, node: int, objs: list[tuple[int, Oid]]) -> None:
        if "objects" in self.failing:
            raise PeerError("flush lost")
        await super().flush_objects(node, objs)


def test_a_queued_flush_that_fails_again_is_counted_once() -> None:
    async def main() -> None:
        f = Fabric()
        a, b = make(f, 1, "1MiB", replicas=1), make(f, 2, "4MiB", replicas=1)
        peers = a.peers = FlakyPeers(f, 1)
        pool = a.new_pool(persistent=True)
        for i, p in enumerate(pages(3, seed=9)):
            assert await a.put(pool, OID, i, p)
        assert await a.remotify_once() == 3
        assert a.flush_page(pool, OID, 0)  # queued for b
        a.flush_object(pool, OID)  # the rest: one object flush, queued behind it
        peers.failing = {"pages", "objects"}
        for _ in range(3):  # the worker retries on every run while b looks alive
            await a.drain_flushes()
        assert a.c.remote_page_flushes_failed == 1
        assert a.c.remote_object_flushes_failed == 0  # never sent: the pages failed first
        assert a.stats()["flushes_queued"] == 2
        peers.failing = {"objects"}
        for _ in range(2):
            await a.drain_flushes()
        assert (a.c.remote_pages_flushed, a.c.remote_page_flushes_failed) == (1, 1)
        assert (a.c.remote_objects_flushed, a.c.remote_object_flushes_failed) == (0, 1)
        peers.failing = set()
        await a.drain_flushes()
        assert (a.c.remote_objects_flushed, a.c.remote_object_flushes_failed) == (1, 1)
        assert a.stats()["flushes_queued"] == 0
        assert b.stats()["foreign_pers_pages"] == 0
        assert await a.put(pool, OID, 7, pages(1, seed=10)[0])
        assert await a.remotify_once() == 1
        assert a.flush_page(pool, OID, 7)
        peers.failing = {"pages"}
        await a.drain_flushes()  # a new flush that fails: counted
        assert a.c.remote_page_flushes_failed == 2

    run(main())
