"""Remotify, remote get/flush, replication and repatriation: a node's page logic.

A :class:`PageEngine` fronts one local :class:`~tmem.zcache.Zcache` for the
node's own clients (NBD export, control API) and serves foreign pages for its
peers.  It talks to peers only through the small async :class:`PeerClient`
interface, so the same logic runs over the real transport and, in unit tests,
over in-process peers.

How it differs from the kernel (reference section 5), on purpose:

* A persistent page goes to ``replicas`` distinct peers (policy-chosen).  When a
  peer is declared down or restarts, every page that had a copy there is
  re-replicated from a surviving copy, so one node's death loses nothing.
* A remote put that fails leaves the page local (no leaked zombie frame).
* A write that finds RAM full is held while the engine remotifies LRU pages,
  instead of failing, as long as some peer has room.
* Flushes of remote pages are queued per peer and always sent before the next
  put batch to that peer, on the same ordered connection, so a flush can never
  overtake (or be overtaken by) a later put of the same handle.  A put of a
  handle whose remotify is in flight wins (``replace`` refuses the stale
  zombie), and the stale remote copies are flushed.

The local side is the kernel's design on the Zcache hooks: the worker takes
whole LRU frames with ``Zcache.zombify_lru``, sends their still-compressed
pages, and swaps each handle's pampd for a :class:`RemoteEntry` with
``Zcache.replace(..., expected=zombie)`` (a newer put or flush meanwhile wins).
``Zcache.get`` raises ``RemotePageError`` for such a handle and the engine fetches
it; when tmem drops one (flush, newer put, object flush, pool destroy) zcache
calls :meth:`PageEngine.on_free`, which queues the remote flush.  Foreign pages
in a zombified frame, and pages no peer took, go back to the LRU (``unzombify``).
Pages travel in their stored form (``zombify_lru``/``get_compressed`` -> wire ->
``put_compressed``): no recompression on the receiver, re-replication forwards
bytes as they are; only the owner decompresses, when it reads a remote page.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeVar

from tmem.errors import RemotePageError, TmemError, UnknownPoolError
from tmem.zcache import LOCAL_CLIENT, Oid, PutResult, Zcache, ZombiePage

from . import fastpath
from .policy import TargetPolicy

log = logging.getLogger("tmem.ramster.remotify")

Key = tuple[int, Oid, int]  # (pool_id, oid, index) in the owner's numbering
_Q = TypeVar("_Q")  # a queued flush: a page Key or a (pool_id, oid)
Blob = tuple[bytes, bool]  # a page's stored form: (data, compressed)


PUT_ROOM_TRIES: Final = 16  # make_room rounds a put may wait for before it fails


class PutStatus:
    """Per-page status of a remote put (wire values)."""

    STORED = fastpath.STORED
    FULL = fastpath.FULL  # receiver out of room (or under its reserve): sender keeps the page
    POOR = fastpath.POOR  # did not compress well enough
    BAD = fastpath.BAD  # bad pool / handle / page


class PeerError(TmemError):
    """A peer could not be reached or did not answer in time."""


class PeerClient(Protocol):
    """How the engine reaches other nodes (the transport implements it)."""

    async def put_pages(
        self, node: int, persistent: bool, items: list[tuple[Key, bytes, bool]]
    ) -> list[int]: ...

    async def get_pages(self, node: int, keys: list[Key], free: bool) -> list[Blob | None]: ...

    async def flush_pages(self, node: int, keys: list[Key]) -> None: ...

    async def flush_objects(self, node: int, objs: list[tuple[int, Oid]]) -> None: ...

    async def destroy_pools(self, node: int, pools: list[int]) -> None: ...


@dataclass(slots=True)
class RemoteEntry:
    """Where the copies of a remotified page live."""

    nodes: list[int]
    persistent: bool


@dataclass(slots=True)
class Counters:
    """The kernel's RAMster debugfs counters (5.13) plus what replication adds."""

    eph_pages_remoted: int = 0
    pers_pages_remoted: int = 0
    eph_pages_remote_failed: int = 0
    pers_pages_remote_failed: int = 0
    remote_eph_pages_succ_get: int = 0
    remote_pers_pages_succ_get: int = 0
    remote_eph_pages_unsucc_get: int = 0
    remote_pers_pages_unsucc_get: int = 0
    pers_pages_remote_nomem: int = 0
    remote_objects_flushed: int = 0
    remote_pages_flushed: int = 0
    remote_object_flushes_failed: int = 0
    remote_page_flushes_failed: int = 0
    remote_pools_destroyed: int = 0
    foreign_eph_pages: int = 0
    foreign_eph_pages_max: int = 0
    foreign_pers_pages: int = 0
    foreign_pers_pages_max: int = 0
    foreign_puts_refused: int = 0
    remote_pers_pages: int = 0
    remote_eph_pages: int = 0
    pers_pages_repatriated: int = 0
    pers_pages_rereplicated: int = 0
    pers_pages_under_replicated: int = 0
    pers_pages_lost: int = 0
    eph_pages_lost: int = 0
    writes_held: int = 0
    writes_failed_nomem: int = 0
    remotify_runs: int = 0
    stale_remotify_discarded: int = 0


def _mark_failed(queue: dict[_Q, bool], sent: list[_Q]) -> int:
    """Mark the queued flushes of a failed send; return how many failed for the first
    time (each flush counts as failed once, however often it is retried)."""
    first = [key for key in sent if queue.get(key) is False]
    for key in first:
        queue[key] = True
    return len(first)


@dataclass(slots=True)
class _PeerOutbox:
    # Queued flushes, in order; the value says a send of it has failed already (it is
    # counted as failed once, however often it is retried).
    flush_pages: dict[Key, bool] = field(default_factory=dict)
    flush_objects: dict[tuple[int, Oid], bool] = field(default_factory=dict)
    destroy_pools: dict[int, None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.flush_pages or self.flush_objects or self.destroy_pools)


class PageEngine:
    """Local + remote page store of one node (see module docstring)."""

    def __init__(
        self,
        zcache: Zcache,
        *,
        node_number: int,
        peers: PeerClient,
        policy: TargetPolicy,
        live_peers: Callable[[], dict[int, int]],
        replicas: int = 2,
        low_watermark: float = 0.25,
        high_watermark: float = 0.5,
        batch: int = 128,
        remotify_ephemeral: bool = True,
        remotify_persistent: bool = True,
    ) -> None:
        self.zc = zcache
        self.node_number = node_number
        self.peers = peers
        self.policy = policy
        self.live_peers = live_peers  # () -> dict[node, advertised free frames]
        self.replicas = replicas
        self.low_frames = int(zcache.frames_total * low_watermark)
        self.high_frames = int(zcache.frames_total * high_watermark)
        self.batch = batch
        self.remotify_ephemeral = remotify_ephemeral
        self.remotify_persistent = remotify_persistent
        self.c = Counters()
        # local pools of the node's own client: pool_id -> persistent
        self.pools: dict[int, bool] = {}
        # Every remote pampd installed in zcache, by handle (for re-replication).
        self.remote: dict[Key, RemoteEntry] = {}
        self.under: dict[Key, None] = {}  # persistent entries with < replicas copies
        self.peer_errors = 0  # failed sends; a change means the live set may differ
        self.outbox: dict[int, _PeerOutbox] = {}
        self.send_lock = asyncio.Lock()
        # A flush_object/destroy_pool in progress: (pool, oid or None, holders seen).
        self._bulk: tuple[int, Oid | None, set[int]] | None = None
        # foreign pools: (client, pool_id) -> persistent
        self.foreign: dict[tuple[int, int], bool] = {}
        self._foreign_counted = 0.0
        zcache.remote_hooks = self

    # ------------------------------------------------------------------ helpers
    def _persistent(self, pool_id: int) -> bool:
        try:
            return self.pools[pool_id]
        except (KeyError, TypeError):
            raise UnknownPoolError(f"no pool {pool_id!r}") from None

    def _queue_flush(self, node: int, key: Key) -> None:
        self.outbox.setdefault(node, _PeerOutbox()).flush_pages.setdefault(key, False)

    def _unregister(self, key: Key, entry: RemoteEntry) -> None:
        if self.remote.get(key) is entry:
            del self.remote[key]
            self.under.pop(key, None)
            if entry.persistent:
                self.c.remote_pers_pages -= 1
            else:
                self.c.remote_eph_pages -= 1

    def _register(self, key: Key, entry: RemoteEntry) -> None:
        self.remote[key] = entry
        if entry.persistent:
            self.c.remote_pers_pages += 1
            if len(entry.nodes) < self.replicas:
                self.under[key] = None
        else:
            self.c.remote_eph_pages += 1

    def on_free(
        self, client: int, pool_id: int, oid: Oid | None, index: int, pampd: object
    ) -> None:
        """RemoteHooks: tmem dropped a remote pampd (flush, newer put, object/pool flush).

        Nothing is sent from here (we may be inside a zcache call): the flush is
        queued per holder and sent by the worker before its next put to that peer.
        """
        if client != LOCAL_CLIENT or oid is None or not isinstance(pampd, RemoteEntry):
            return
        key = (pool_id, oid, index)
        self._unregister(key, pampd)
        bulk = self._bulk
        if bulk is not None and bulk[0] == pool_id and bulk[1] in (None, oid):
            bulk[2].update(pampd.nodes)  # one object/pool flush per holder instead
            return
        for node in pampd.nodes:
            self._queue_flush(node, key)

    def room(self) -> int:
        """Frames this node offers to peers: free frames above its own reserve."""
        return max(0, self.zc.frames_free - self.low_frames)

    # ----------------------------------------------------------- local clients
    def new_pool(self, persistent: bool = False) -> int:
        pool_id = self.zc.new_pool(persistent=persistent)
        self.pools[pool_id] = persistent
        return pool_id

    def adopt_pool(self, pool_id: int, persistent: bool) -> None:
        """Manage a local pool created directly on the Zcache (e.g. by the NBD device)."""
        if not self.zc.has_pool(pool_id) or self.zc.is_persistent(pool_id) is not persistent:
            raise UnknownPoolError(
                f"no local {'persistent' if persistent else 'ephemeral'} pool {pool_id!r}"
            )
        self.pools[pool_id] = persistent

    async def make_room(self, frames: int) -> bool:
        """Remotify until ``frames`` frames are free (front ends call it before a write).

        True if there is room now; False if no peer could take more pages.
        """
        if self.zc.frames_free >= frames:
            return True
        self.c.writes_held += 1
        retries = 0
        while self.zc.frames_free < frames:
            errors = self.peer_errors
            if await self.remotify_once(max(self.batch, frames)) == 0:
                # A peer that failed mid-send (e.g. just died) changed the live set:
                # try again with the peers that are left.
                if self.peer_errors != errors and retries < 5:
                    retries += 1
                    await asyncio.sleep(0.01 * retries)
                    continue
                self.c.writes_failed_nomem += 1
                return False
        return True

    async def fetch_remote(self, pool_id: int, oid: Oid, index: int, pampd: object) -> bytes:
        """Read a remote page for a front end that stores it back itself (NBD).

        The caller's put of the page replaces the remote pampd, and zcache's
        :meth:`on_free` hook then frees the remote copies.  Raises a TmemError when
        no live copy can be read (the front end reports an I/O error).
        """
        if not isinstance(pampd, RemoteEntry):
            raise PeerError(f"not a remote page: {pampd!r}")
        page = await self._remote_get((pool_id, oid, index), pampd, False, repatriate=False)
        if page is None:
            raise PeerError(f"page {(pool_id, oid, index)!r} is gone")
        return page

    async def put(self, pool_id: int, oid: Oid, index: int, page: bytes) -> bool:
        """Store a page; if RAM is full, hold the write while pages are remotified.

        A newer put of a remote handle drops the remote pampd in zcache, whose
        hook queues the flush of the old remote copies (ordered before any later
        put of the same handle to the same peer).
        """
        self._persistent(pool_id)
        for _ in range(PUT_ROOM_TRIES):
            status = self.zc.put_status(pool_id, oid, index, page)
            if status is PutResult.STORED:
                return True
            # NO_MEMORY means no room: make_room(1) remotifies until a frame is free.
            # A free frame is room for any page with the allocators here; the bound
            # only keeps an allocator that needs more from spinning forever.
            if status is not PutResult.NO_MEMORY or not await self.make_room(1):
                return False
        return False

    async def get(
        self, pool_id: int, oid: Oid, index: int, free: bool | None = None
    ) -> bytes | None:
        """A local hit, or a fetch from a peer holding a copy."""
        persistent = self._persistent(pool_id)
        if free is None:
            free = not persistent
        try:
            return self.zc.get(pool_id, oid, index, free=free)
        except RemotePageError as exc:
            entry = exc.pampd
        if not isinstance(entry, RemoteEntry):
            return None
        return await self._remote_get((pool_id, oid, index), entry, free)

    def _current(self, key: Key, entry: RemoteEntry) -> bool:
        """Does zcache still map ``key`` to ``entry`` (no flush or newer put meanwhile)?"""
        try:
            return self.zc.lookup(key[0], key[1], key[2]) is entry
        except TmemError:
            return False

    async def _first_copy(
        self, nodes: list[int], key: Key, and_free: bool
    ) -> tuple[Blob | None, int | None]:
        """The page from the first of ``nodes`` that has it, and that node; else None."""
        for node in nodes:
            try:
                got = await self.peers.get_pages(node, [key], and_free)
            except PeerError:
                continue
            if got and got[0] is not None:
                return got[0], node
        return None, None

    async def _remote_get(
        self, key: Key, entry: RemoteEntry, free: bool, *, repatriate: bool = True
    ) -> bytes | None:
        live = self.live_peers()
        order = sorted(entry.nodes, key=lambda n: (n not in live, n))
        # Ephemeral pages are fetched with get-and-free (the kernel's exclusive get).
        # A persistent page is read without freeing and its copies are flushed after:
        # a reply lost after a remote free must not lose the page.
        and_free = free and not entry.persistent
        blob, source = await self._first_copy(order, key, and_free)
        page = None if blob is None else self._page(blob)
        if not self._current(key, entry):
            # Flushed or rewritten while we waited: the fetched copy is the value
            # this get observed; the newer operation already owns the state.
            return page
        if page is None or blob is None:
            if not entry.persistent:
                self.c.remote_eph_pages_unsucc_get += 1
                self._drop_entry(key, entry)
                return None  # tmem allows ephemeral pages to vanish
            self.c.remote_pers_pages_unsucc_get += 1
            # Never pass a persistent page that exists off as a miss.
            raise PeerError(f"no copy of persistent page {key!r} is reachable now")
        if entry.persistent:
            self.c.remote_pers_pages_succ_get += 1
        else:
            self.c.remote_eph_pages_succ_get += 1
        if free:
            if and_free and source is not None and source in entry.nodes:
                entry.nodes.remove(source)  # that copy is gone already (get-and-free)
            self._drop_entry(key, entry)
        elif repatriate and entry.persistent and self.zc.frames_free > self.high_frames:
            self._repatriate(key, blob)
        return page

    def _drop_entry(self, key: Key, entry: RemoteEntry) -> None:
        """Unmap a remote handle ourselves and flush its remaining copies."""
        self.zc.remove_entry(key[0], key[1], key[2])  # no hook: we do the remote side
        self._unregister(key, entry)
        for node in entry.nodes:
            self._queue_flush(node, key)

    def _page(self, blob: Blob) -> bytes:
        data, compressed = blob
        return self.zc.decompress(data) if compressed else data

    def _repatriate(self, key: Key, blob: Blob) -> bool:
        pool_id, oid, index = key
        # The local put replaces the remote pampd; its hook queues the remote flushes.
        st = self.zc.put_compressed(pool_id, oid, index, blob[0], compressed=blob[1])
        if st is not PutResult.STORED:
            self.c.pers_pages_remote_nomem += 1
            return False
        self.c.pers_pages_repatriated += 1
        return True

    def flush_page(self, pool_id: int, oid: Oid, index: int) -> bool:
        self._persistent(pool_id)
        return self.zc.flush_page(pool_id, oid, index)

    def flush_object(self, pool_id: int, oid: Oid) -> int:
        self._persistent(pool_id)
        holders: set[int] = set()
        self._bulk = (pool_id, oid, holders)
        try:
            n = self.zc.flush_object(pool_id, oid)
        finally:
            self._bulk = None
        for node in holders:
            self.outbox.setdefault(node, _PeerOutbox()).flush_objects.setdefault(
                (pool_id, oid), False
            )
        return n

    def destroy_pool(self, pool_id: int) -> int:
        self._persistent(pool_id)
        holders: set[int] = set()
        self._bulk = (pool_id, None, holders)
        try:
            n = self.zc.destroy_pool(pool_id)
        finally:
            self._bulk = None
        del self.pools[pool_id]
        for node in holders:
            box = self.outbox.setdefault(node, _PeerOutbox())
            box.flush_pages = {k: v for k, v in box.flush_pages.items() if k[0] != pool_id}
            box.flush_objects = {o: v for o, v in box.flush_objects.items() if o[0] != pool_id}
            box.destroy_pools[pool_id] = None
        return n

    # ------------------------------------------------------------ the worker
    async def drain_flushes(self) -> None:
        """Send every queued flush; a peer that fails keeps its queue for later."""
        for node in list(self.outbox):
            box = self.outbox[node]
            if not box or node not in self.live_peers():
                continue
            pages, objs, pools = (
                list(box.flush_pages),
                list(box.flush_objects),
                list(box.destroy_pools),
            )
            chunk: list[Key] = []  # the flushes being sent when a send fails
            sending: list[tuple[int, Oid]] = []
            try:
                for i in range(0, len(pages), self.batch * 4):
                    chunk = pages[i : i + self.batch * 4]
                    await self.peers.flush_pages(node, chunk)
                    for k in chunk:
                        box.flush_pages.pop(k, None)
                    self.c.remote_pages_flushed += len(chunk)
                chunk = []
                if objs:
                    sending = objs
                    await self.peers.flush_objects(node, objs)
                    for o in objs:
                        box.flush_objects.pop(o, None)
                    self.c.remote_objects_flushed += len(objs)
                    sending = []
                if pools:
                    await self.peers.destroy_pools(node, pools)
                    for p in pools:
                        box.destroy_pools.pop(p, None)
                    self.c.remote_pools_destroyed += len(pools)
            except PeerError:
                # Flushes queued behind the failed send were not tried. All stay queued.
                self.c.remote_page_flushes_failed += _mark_failed(box.flush_pages, chunk)
                self.c.remote_object_flushes_failed += _mark_failed(box.flush_objects, sending)

    def _victims(self, limit: int) -> list[ZombiePage]:
        """Zombify LRU frames until ``limit`` local pages are collected.

        Only the owner remotifies its pages: a frame holding only foreign pages goes
        straight back to the LRU, and a foreign buddy of a local page stays put.
        """
        out: list[ZombiePage] = []
        classes = [
            c
            for c, on in ((True, self.remotify_persistent), (False, self.remotify_ephemeral))
            if on
        ]
        for persistent in classes:
            tries = 0
            while len(out) < limit and tries < 4 * limit:
                tries += 1
                zps = self.zc.zombify_lru(persistent)
                if not zps:
                    break
                mine = [zp for zp in zps if zp.client == LOCAL_CLIENT and zp.pool_id in self.pools]
                if mine:
                    # A foreign buddy stays; remotify_once unzombifies the frame after.
                    out.extend(mine)
                else:
                    self.zc.unzombify(zps[0])
        return out

    async def remotify_once(self, limit: int | None = None) -> int:
        """Move up to ``limit`` LRU local pages to peers; returns pages moved."""
        limit = self.batch if limit is None else limit
        async with self.send_lock:
            self.c.remotify_runs += 1
            # Victims first, then the drain: every remote flush that could concern a
            # victim's handle was queued before it became a (local) zombie, so this
            # drain sends it before the put below.  A flush queued later can only be
            # for a handle that is remote now, never for a victim.
            victims = self._victims(limit)
            await self.drain_flushes()
            if not victims:
                return 0
            moved = 0
            for persistent in (True, False):
                group = [v for v in victims if v.persistent is persistent]
                if group:
                    moved += await self._send_group(group, persistent)
            for zp in victims:  # whatever was not replaced goes back to the LRU
                self.zc.unzombify(zp)
            return moved

    async def _send_group(self, group: list[ZombiePage], persistent: bool) -> int:
        live = self.live_peers()
        live.pop(self.node_number, None)
        # A peer whose flush queue did not drain could see a put before an older
        # flush of the same handle: count it live (for ``required``) but send it
        # nothing this round.
        blocked = {n for n, box in self.outbox.items() if box and n in live}
        want = self.replicas if persistent else 1
        # A persistent page needs ``replicas`` copies on live peers.  Only when peers
        # are down (not merely full) do we accept fewer: the missing copies are then
        # re-made when nodes return, and a single death still loses nothing.
        required = min(want, len(live))
        targets = self.policy.choose(live, want, exclude={self.node_number, *blocked})
        if not targets or len(targets) < required:
            if persistent:
                self.c.pers_pages_remote_failed += len(group)
            else:
                self.c.eph_pages_remote_failed += len(group)
            return 0
        items = [((zp.pool_id, zp.oid, zp.index), bytes(zp.data), zp.compressed) for zp in group]
        results = await asyncio.gather(
            *(self.peers.put_pages(t, persistent, items) for t in targets),
            return_exceptions=True,
        )
        accepted: list[list[int]] = [[] for _ in group]
        for target, res in zip(targets, results, strict=True):
            if isinstance(res, BaseException):
                if not isinstance(res, PeerError):
                    raise res
                self.peer_errors += 1
                continue
            for i, st in enumerate(res[: len(group)]):
                if st == PutStatus.STORED:
                    accepted[i].append(target)
        moved = 0
        for zp, nodes in zip(group, accepted, strict=True):
            key = (zp.pool_id, zp.oid, zp.index)
            if not nodes or len(nodes) < required:
                for node in nodes:  # too few copies to be safe: undo the partial ones
                    self._queue_flush(node, key)
                if persistent:
                    self.c.pers_pages_remote_failed += 1
                else:
                    self.c.eph_pages_remote_failed += 1
                continue
            entry = RemoteEntry(nodes, persistent)
            if not self.zc.replace(zp.pool_id, zp.oid, zp.index, entry, expected=zp):
                # Rewritten or flushed while in flight: the copies just sent are stale.
                self.c.stale_remotify_discarded += 1
                for node in nodes:
                    self._queue_flush(node, key)
                continue
            self._register(key, entry)
            if persistent:
                self.c.pers_pages_remoted += 1
            else:
                self.c.eph_pages_remoted += 1
            moved += 1
        return moved

    def need_remotify(self) -> bool:
        return self.zc.frames_free < self.low_frames

    async def repatriate(self, limit: int | None = None) -> int:
        """Pull persistent pages home while local memory is above the high watermark."""
        limit = self.batch if limit is None else limit
        done = 0
        live = self.live_peers()
        for key in list(itertools.islice(self.remote, limit)):
            if self.zc.frames_free <= self.high_frames:
                break
            entry = self.remote.get(key)
            if entry is None or not entry.persistent:
                continue
            for node in [n for n in entry.nodes if n in live]:
                try:
                    got = await self.peers.get_pages(node, [key], False)
                except PeerError:
                    continue
                if not self._current(key, entry):
                    break
                if got and got[0] is not None:
                    if self._repatriate(key, got[0]):
                        done += 1
                    break
        return done

    # ------------------------------------------------------- node failure
    def node_lost(self, node: int, restarted: bool) -> None:
        """A peer went down or restarted: its copies no longer count."""
        if restarted:
            self.outbox.pop(node, None)  # its memory is empty: nothing to flush there
        for key, entry in list(self.remote.items()):
            if node not in entry.nodes:
                continue
            entry.nodes.remove(node)
            if not restarted:
                # If it comes back with the same memory, free what it still holds.
                self._queue_flush(node, key)
            if entry.nodes:
                if entry.persistent:
                    self.under[key] = None
                continue
            with contextlib.suppress(TmemError):
                self.zc.remove_entry(key[0], key[1], key[2])
            self._unregister(key, entry)
            if entry.persistent:
                self.c.pers_pages_lost += 1
                log.error("persistent page %r lost: no copy survives", key)
            else:
                self.c.eph_pages_lost += 1
        if restarted:
            self.drop_foreign(node)

    async def rereplicate(self, limit: int | None = None) -> int:
        """Bring under-replicated persistent pages back to ``replicas`` copies."""
        limit = self.batch if limit is None else limit
        if not self.under:
            return 0
        done = 0
        async with self.send_lock:
            await self.drain_flushes()
            live = self.live_peers()
            for key in list(itertools.islice(self.under, limit)):
                entry = self.remote.get(key)
                if entry is None or len(entry.nodes) >= self.replicas:
                    self.under.pop(key, None)
                    continue
                sources = [n for n in entry.nodes if n in live]
                targets = self.policy.choose(
                    live,
                    self.replicas - len(entry.nodes),
                    exclude={self.node_number, *entry.nodes},
                )
                if not sources or not targets:
                    continue
                blob, _source = await self._first_copy(sources, key, False)
                if blob is None or self.remote.get(key) is not entry:
                    continue
                for t in targets:
                    try:
                        st = await self.peers.put_pages(t, True, [(key, *blob)])
                    except PeerError:
                        continue
                    if self.remote.get(key) is not entry:
                        self._queue_flush(t, key)
                        break
                    if st and st[0] == PutStatus.STORED:
                        entry.nodes.append(t)
                        self.c.pers_pages_rereplicated += 1
                if len(entry.nodes) >= self.replicas:
                    self.under.pop(key, None)
                    done += 1
        return done

    # ------------------------------------------------------ foreign pages
    def _foreign_pool(self, client: int, pool_id: int, persistent: bool) -> bool:
        have = self.foreign.get((client, pool_id))
        if have is None:
            try:
                self.zc.new_pool(persistent=persistent, client=client, pool_id=pool_id)
            except TmemError:
                return False
            self.foreign[(client, pool_id)] = persistent
            return True
        return have is persistent

    def _note_foreign_soon(self) -> None:
        """Recount after a change, at most every 0.25 s (the recount walks the pools)."""
        now = time.monotonic()
        if now - self._foreign_counted >= 0.25:
            self._note_foreign()

    def _note_foreign(self) -> None:
        """Recount foreign pages from zcache (exact even after ephemeral eviction)."""
        self._foreign_counted = time.monotonic()
        c = self.c
        counts = [0, 0]
        for (client, pool_id), persistent in self.foreign.items():
            counts[persistent] += self.zc.pool_pages(pool_id, client=client)
        c.foreign_eph_pages, c.foreign_pers_pages = counts
        c.foreign_eph_pages_max = max(c.foreign_eph_pages_max, counts[0])
        c.foreign_pers_pages_max = max(c.foreign_pers_pages_max, counts[1])

    def store_foreign(
        self, client: int, persistent: bool, items: Iterable[tuple[Key, bytes, bool]]
    ) -> list[int]:
        """A peer's remote put: store within our budget, keep our own reserve.

        Hot path of remotify (and of the benchmark): the per-page loop is
        :func:`tmem.ramster.fastpath.store_pages` (compiled with mypyc).
        """

        def pool_ok(pool_id: int) -> bool:
            return client != LOCAL_CLIENT and self._foreign_pool(client, pool_id, persistent)

        out, refused = fastpath.store_pages(self.zc, client, items, pool_ok, self.low_frames)
        self.c.foreign_puts_refused += refused
        self._note_foreign_soon()
        return out

    def get_foreign(self, client: int, keys: Iterable[Key], free: bool) -> list[Blob | None]:
        """A peer's remote get (get-and-free when ``free``); None = miss or no such pool."""
        pools = {p for (c, p) in self.foreign if c == client}
        out = fastpath.fetch_pages(self.zc, client, pools, keys, free)
        if free:
            self._note_foreign_soon()
        return out

    def flush_foreign(self, client: int, keys: Iterable[Key]) -> int:
        n = 0
        flush = self.zc.flush_page
        for pool_id, oid, index in keys:
            if (client, pool_id) not in self.foreign:
                continue
            try:
                n += flush(pool_id, oid, index, client=client)
            except TmemError:
                continue
        self._note_foreign_soon()
        return n

    def flush_foreign_objects(self, client: int, objs: Iterable[tuple[int, Oid]]) -> int:
        n = 0
        for pool_id, oid in objs:
            if (client, pool_id) not in self.foreign:
                continue
            try:
                n += self.zc.flush_object(pool_id, oid, client=client)
            except TmemError:
                continue
        self._note_foreign_soon()
        return n

    def destroy_foreign_pools(self, client: int, pools: Iterable[int]) -> int:
        n = 0
        for pool_id in pools:
            if self.foreign.pop((client, pool_id), None) is None:
                continue
            n += self.zc.destroy_pool(pool_id, client=client)
        self._note_foreign_soon()
        return n

    def drop_foreign(self, client: int) -> int:
        """A peer restarted: the pages it gave us belong to a dead incarnation."""
        return self.destroy_foreign_pools(
            client, [p for (c, p) in list(self.foreign) if c == client]
        )

    def stats(self) -> dict[str, int | float]:
        s: dict[str, int | float] = {k: getattr(self.c, k) for k in Counters.__dataclass_fields__}
        self._note_foreign()
        s.update(
            foreign_eph_pages=self.c.foreign_eph_pages,
            foreign_pers_pages=self.c.foreign_pers_pages,
            foreign_eph_pages_max=self.c.foreign_eph_pages_max,
            foreign_pers_pages_max=self.c.foreign_pers_pages_max,
        )
        s["pers_pages_under_replicated"] = len(self.under)
        s["flushes_queued"] = sum(
            len(b.flush_pages) + len(b.flush_objects) for b in self.outbox.values()
        )
        return s
