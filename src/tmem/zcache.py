"""zcache: compression, the RAM budget and reclaim, behind the tmem API.

zcache is the backend (the "PAM") for the tmem core (:mod:`tmem.tmem_core`). It owns
the pageframes (an :class:`~tmem.arena.Arena`: the budget, taken from the operating
system as frames are first used and given back as they empty) and lends them to an
allocator (:mod:`tmem.allocator`: zsmalloc by default, or the seed's zbud). What it
knows about each stored page (its tmem handle, codec, class and LRU place) lives in
its :class:`~tmem.pagetable.PageTable`, by allocator handle. The put path
(kernel-zcache2.md section 4.3, with the RFC's fixes):

1. compress; a same-filled page (all bytes one 8-byte pattern, e.g. zero) gets a pampd
   with no storage; a page over the class threshold is rejected (ephemeral > 4000 B,
   persistent > 3584 B, or with zbud > 2560 B while the persistent mean is > 2560 B), or
   with ``huge_pages=True`` a persistent one is kept raw;
2. allocate: never fail while an allocator frame has room; else a new frame from the
   budget; else compress staged pages, compact, then **ouroboros**: evict LRU ephemeral
   pages (flushing their tmem entries), so persistent data outranks cache data; else,
   for a persistent put with a ``writeback`` target, write LRU persistent pages back;
   else the put fails;
3. map the handle to the new pampd; an older copy under the handle is freed. A put that
   fails also flushes any older copy: a stale page must never be returned.

The budget covers data and metadata: the arena's frame limit is lowered by what the
page table, the allocator and the tmem index take.

The hot paths (:meth:`Zcache.put`, :meth:`Zcache.get`) are written flat on purpose:
puts per second is a feature, and every Python call costs.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Protocol

from tmem.allocator import EPH, PAGE_SIZE, PERS, Allocator
from tmem.arena import Arena
from tmem.compress import Compressor, find_fills, get_compressor
from tmem.errors import (
    ConfigError,
    InvalidHandleError,
    PageSizeError,
    RemotePageError,
    TmemError,
    UnknownPoolError,
)
from tmem.pagetable import (
    C_MAIN,
    C_RAW,
    C_STRONG,
    CODEC_MASK,
    L_EPH,
    L_PERS,
    L_STAGED,
    NIL,
    P_LIVE,
    P_PERS,
    P_STAGED,
    P_ZOMBIE,
    PageTable,
)
from tmem.sizes import parse_size
from tmem.tmem_core import (
    EMPTY,
    LOCAL_CLIENT,
    U32_MAX,
    Obj,
    Oid,
    Pampd,
    Pool,
    Tmem,
    check_index,
    check_oid,
)
from tmem.zbud import Zbud
from tmem.zsmalloc import Zsmalloc

__all__ = [
    "ALLOCATORS",
    "LOCAL_CLIENT",
    "Oid",
    "PutResult",
    "RemoteHooks",
    "WritebackTarget",
    "Zcache",
    "ZombiePage",
]

# Argument types of the public entry points. They check their arguments themselves and
# raise TmemError subclasses; when this module is compiled with mypyc, a precise
# annotation would be enforced first and turn bad input into a bare TypeError.
PoolIdArg = Any
OidArg = Any
IndexArg = Any
PageArg = Any

ALLOCATORS: Final = ("zsmalloc", "zbud")
EPH_MAX_ZSIZE: Final = 4000
PERS_MAX_ZSIZE: Final = PAGE_SIZE * 7 // 8  # 3584
SAME_FILLED_PROBE: Final = 64  # only pages compressing to <= this many bytes can be same-filled
CHARGE_EVERY: Final = 1024  # pages stored between two metadata charges to the budget
COMPACT_EVERY: Final = 256  # frees between two fragmentation checks, at first
COMPACT_EVERY_MAX: Final = 65536
RECOMPRESS_MIN_GAIN: Final = 32  # bytes a recompression must save to be kept


class PutResult(enum.IntEnum):
    """Why a put did or did not store the page."""

    STORED = 0
    POOR_COMPRESSION = 1  # compressed size over the class threshold (compress_poor)
    NO_MEMORY = 2  # budget full and nothing could be reclaimed


@dataclass(frozen=True, slots=True)
class ZombiePage:
    """A page handed out by :meth:`Zcache.zombify_lru` for writeback or remotify.

    ``data`` is the stored form: compressed with the Zcache's compressor, or the raw
    page when ``compressed`` is False (huge pages). The page stays readable in tmem
    until the caller drops it (:meth:`Zcache.replace`, a flush) or gives it back
    (:meth:`Zcache.unzombify`).
    """

    client: int
    pool_id: int
    oid: Oid
    index: int
    data: bytes
    compressed: bool
    pampd: int
    persistent: bool


class WritebackTarget(Protocol):
    """Where LRU persistent pages go when RAM is full (the seed's nice-to-have A)."""

    def write_back(self, pool_id: int, oid: Oid, index: int, page: bytes) -> bool:
        """Store ``page`` elsewhere; True means zcache may drop its copy."""
        ...


class RemoteHooks(Protocol):
    """Told when tmem drops a non-local (remote) pampd, so its owner can flush it."""

    def on_free(
        self, client: int, pool_id: int, oid: Oid | None, index: int, pampd: object
    ) -> None: ...


@dataclass(slots=True)
class ZcacheCounters:
    """zcache's event counters (kernel debugfs names, section 4.11, where they exist).

    Kept off the Zcache instance so its attributes stay few enough for CPython's fast
    attribute access on the put/get paths.
    """

    flush_total: int = 0
    flush_found: int = 0
    flobj_total: int = 0
    flobj_found: int = 0
    failed_eph_puts: int = 0
    failed_pers_puts: int = 0
    failed_getfreepages: int = 0
    compress_poor: int = 0
    mean_compress_poor: int = 0
    eph_ate_tail: int = 0
    eph_ate_tail_failed: int = 0
    pers_ate_eph: int = 0
    pers_ate_eph_failed: int = 0
    evicted_eph_zpages: int = 0
    evicted_eph_pageframes: int = 0
    zero_filled_pages: int = 0
    zero_filled_pages_max: int = 0
    same_filled_pages_total: int = 0
    huge_pages_stored: int = 0
    staged_pages_total: int = 0  # persistent puts stored raw for compress-behind
    compacted_pages: int = 0  # staged pages compress-behind has dealt with
    writtenback_pages: int = 0
    writeback_failed: int = 0
    failed_gets: int = 0  # get/get_many found no page (read_run misses are the caller's)
    recompressed_pages: int = 0  # pages moved to the strong codec
    recompress_saved_bytes: int = 0
    recompress_skipped: int = 0  # looked at, but the strong codec did not pay


def make_allocator(name: str, arena: Arena) -> Allocator:
    """The allocator called ``name`` (:data:`ALLOCATORS`) over ``arena``'s frames."""
    key = name.lower().strip()
    if key == "zsmalloc":
        return Zsmalloc(arena)
    if key == "zbud":
        return Zbud(arena)
    raise ConfigError(f"unknown allocator {name!r}; choose from {', '.join(ALLOCATORS)}")


class Zcache:
    """A compressed page store with a hard RAM budget (data and metadata).

    >>> zc = Zcache(memory="1MiB")
    >>> pool = zc.new_pool(persistent=True)
    >>> zc.put(pool, (1, 2, 3), 7, b"x" * 4096)
    True
    >>> zc.get(pool, (1, 2, 3), 7) == b"x" * 4096
    True
    """

    page_size = PAGE_SIZE

    def __init__(
        self,
        memory: int | str = "64MiB",
        compressor: str = "lz4",
        *,
        huge_pages: bool = False,
        writeback: WritebackTarget | None = None,
        prefault: bool = False,
        compress_behind: bool = False,
        allocator: str = "zsmalloc",
        recompress: str | None = None,
        recompress_after: float = 30.0,
    ) -> None:
        nbytes = parse_size(memory)
        if nbytes < PAGE_SIZE:
            raise ConfigError(f"memory budget must be at least one page (4096 B), got {nbytes}")
        self.compressor: Compressor = get_compressor(compressor)
        self._compress = self.compressor.compress
        self._decompress = self.compressor.decompress
        self._gather = self.compressor.gather
        self.strong: Compressor | None = None
        if recompress is not None and str(recompress).lower() not in ("", "none", "off"):
            self.strong = get_compressor(str(recompress))
        if recompress_after < 0:
            raise ConfigError(f"recompress_after must be >= 0 seconds, got {recompress_after}")
        self.recompress_after = float(recompress_after)
        self.budget = nbytes
        self.huge_pages = huge_pages
        self.prefault = prefault
        # The arena: the whole budget as one mapping, touched as frames are first used
        # and handed back to the OS as they empty (prefault=True: resident up front).
        self.arena = Arena(nbytes // PAGE_SIZE, prefault=prefault)
        self._mm = self.arena.memory
        self.allocator: Allocator = make_allocator(allocator, self.arena)
        self._alloc = self.allocator.alloc
        self._span = self.allocator.span
        self.pages = PageTable(stamps=self.strong is not None)
        # compress-behind: while more than stage_reserve frames are free, a persistent put
        # stores the page raw and returns; compact() compresses it later (when the
        # caller is idle, or at once when a put needs room).
        self.compress_behind = compress_behind
        self.stage_reserve = max(16, self.arena.frames_total // 64)
        self.writeback = writeback
        self.remote_hooks: RemoteHooks | None = None
        self.tmem = Tmem(self)
        self._local = self.tmem.local_by_id
        self.counters = ZcacheCounters()  # kernel names where they exist; see stats()
        self.same_filled = [0, 0]  # per class, pages stored as a pattern (no storage)
        self.remote_pages = [0, 0]
        self.zpages = [0, 0]  # per class, pages the allocator holds
        self.zbytes = [0, 0]
        self.raw_pages = 0  # pages kept uncompressed (huge; staged ones included)
        self.zombie_pages = 0
        self._puts_since_charge = 0
        self._frees = 0  # frees since the last fragmentation check
        self._compact_every = COMPACT_EVERY
        self._frees_total = 0
        self._frees_at_compact = -1  # _frees_total when the slow path last compacted
        self._why = PutResult.STORED  # why the last failed put failed (see put_status)
        # An empty store's own structures are not charged to the budget (like its code);
        # what grows with the pages stored is.
        self._meta_base = self._metadata_estimate()
        self._charge_metadata()

    # ---- the budget ------------------------------------------------------------------

    def _charge_metadata(self) -> None:
        """Lower the arena's frame limit by what the metadata takes now (plus room for
        the next stretch of growth), so data plus metadata stay within the budget."""
        self._puts_since_charge = 0
        # what may grow until the next charge: the page table's next step, and up to
        # CHARGE_EVERY pages (no more than a few a frame) of index and page columns
        pages_ahead = min(CHARGE_EVERY, 4 * self.arena.frames_total)
        ahead = pages_ahead * 48 + self.pages.next_growth_bytes()
        meta = max(0, self._metadata_estimate() - self._meta_base) + ahead
        frames = self.arena.frames_total - -(-meta // PAGE_SIZE)
        # Never below the frames in use: the data already there keeps its frames, and the
        # limit comes down as reclaim and frees return them (frees must always make
        # room: compaction and compress-behind rely on it).
        arena = self.arena
        arena.limit = min(arena.frames_total, max(1, frames, arena.frames_used))

    def _metadata_estimate(self) -> int:
        """Bytes of metadata, from sizes and counts (no walk over pages)."""
        return (
            self.pages.metadata_bytes()
            + self.allocator.metadata_bytes()
            + self.tmem.metadata_bytes()
            + self.arena.metadata_bytes()
        )

    # ---- pools -----------------------------------------------------------------------

    def new_pool(
        self,
        persistent: bool = False,
        shared: bool = False,
        uuid: Any = None,
        *,
        client: int = LOCAL_CLIENT,
        pool_id: PoolIdArg = None,
    ) -> int:
        """Create a pool and return its id (0..15 per client).

        ``shared=True`` with a 16-byte ``uuid``: every caller naming the same uuid gets
        the same pool (cleancache ``init_shared_fs``); it is destroyed by its last user.
        """
        return self.tmem.new_pool(bool(persistent), bool(shared), uuid, client, pool_id).pool_id

    def _pool(self, pool_id: PoolIdArg, client: int) -> Pool:
        pool = self._local.get(pool_id) if type(pool_id) is int and client == LOCAL_CLIENT else None
        return pool if pool is not None else self.tmem.pool(pool_id, client)

    def is_persistent(self, pool_id: PoolIdArg, *, client: int = LOCAL_CLIENT) -> bool:
        return self._pool(pool_id, client).persistent

    def has_pool(self, pool_id: PoolIdArg, *, client: int = LOCAL_CLIENT) -> bool:
        try:
            self._pool(pool_id, client)
        except UnknownPoolError:
            return False
        return True

    def destroy_pool(self, pool_id: PoolIdArg, *, client: int = LOCAL_CLIENT) -> int:
        """Flush every page of the pool and free its id; returns pages flushed."""
        return self.tmem.destroy_pool(self._pool(pool_id, client))

    def pool_pages(self, pool_id: PoolIdArg, *, client: int = LOCAL_CLIENT) -> int:
        return self._pool(pool_id, client).page_count()

    @property
    def frames_total(self) -> int:
        """Frames of the budget (data and metadata)."""
        return self.arena.frames_total

    @property
    def frames_free(self) -> int:
        """Frames the data may still take: the budget less what is used and what the
        metadata is charged."""
        return self.arena.frames_free

    @property
    def frames_used(self) -> int:
        return self.arena.frames_used

    # ---- pamops ----------------------------------------------------------------------

    def free(self, pool: Pool, oid: Oid | None, index: int, pampd: Pampd) -> None:
        """tmem dropped ``pampd``: release its storage (PamOps.free)."""
        if type(pampd) is int:
            if pampd >= 0:
                self._release(pampd)
            else:
                self.same_filled[pool.persistent] -= 1
                if pampd == -1:
                    self.counters.zero_filled_pages -= 1
        else:
            self.remote_pages[pool.persistent] -= 1
            if self.remote_hooks is not None:
                self.remote_hooks.on_free(pool.client, pool.pool_id, oid, index, pampd)

    def _release(self, h: int) -> None:
        """Free the storage of handle ``h`` and forget it (its tmem entry is gone)."""
        pt = self.pages
        f = pt.flags[h]
        cls = (f & P_PERS) >> 1
        start, end = self._span(h)
        self.zpages[cls] -= 1
        self.zbytes[cls] -= end - start
        if f & CODEC_MASK == C_RAW:
            self.raw_pages -= 1
        if f & P_ZOMBIE:
            self.zombie_pages -= 1
        else:
            pt.unlink(h, L_STAGED if f & P_STAGED else cls)
        pt.flags[h] = 0
        pt.obj[h] = NIL
        self.allocator.free(h)
        self._frees += 1
        self._frees_total += 1
        if self._frees >= self._compact_every:
            self._compact_if_fragmented()

    def _compact_if_fragmented(self) -> None:
        """Compact when frees have left more than 1/16 of the frames in use (and at
        least 8) to be won back: fragmentation past a threshold (zram compacts on
        demand; here it needs no caller). When a compaction wins back less than half
        of that, the next check waits twice as many frees (up to 64k)."""
        self._frees = 0
        threshold = max(8, self.arena.frames_used >> 4)
        if self.allocator.compactable_frames() <= threshold:
            return
        before = self.arena.frames_used
        self.allocator.compact(1 << 30)
        if before - self.arena.frames_used < threshold // 2:
            self._compact_every = min(COMPACT_EVERY_MAX, self._compact_every * 2)
        else:
            self._compact_every = COMPACT_EVERY

    # ---- room ------------------------------------------------------------------------

    def _alloc_slow(self, size: int, cls: int) -> int:
        """A handle for ``size`` bytes when the fast path found no room: compress staged
        pages, compact, evict LRU ephemeral pages, then (persistent, with a writeback
        target) write LRU persistent pages back. -1 if nothing frees room.

        An allocator with its own LRU (zbud) frees a frame with each unit, so each is
        followed by a try. Otherwise (zsmalloc) evicted pages free slots across classes
        and frames come back by compaction: reclaim then works in batches (1/64 of the
        frames in use, 16 at least) with one compaction each, so the puts that follow
        find room at once instead of each paying for a compaction.
        """
        alloc = self._alloc
        if self._puts_since_charge:
            self._charge_metadata()
            h = alloc(size, cls)
            if h >= 0:
                return h
        while self.pages.count[L_STAGED]:
            self.compact(1)
            h = alloc(size, cls)
            if h >= 0:
                return h
        h = self._compact_for(size, cls)
        if h >= 0:
            return h
        self.counters.failed_getfreepages += 1
        persistent = cls == PERS
        keeps_lru = self.allocator.keeps_lru
        batch = 1 if keeps_lru else max(16, self.arena.frames_used >> 6)
        evicted = 0
        while self._evict_eph_unit():
            evicted += 1
            if persistent:
                self.counters.pers_ate_eph += 1
            else:
                self.counters.eph_ate_tail += 1
            if evicted % batch == 0:
                h = alloc(size, cls) if keeps_lru else self._compact_for(size, cls)
                if h >= 0:
                    return h
        h = self._compact_for(size, cls)
        if h >= 0:
            return h
        if not persistent:
            self.counters.eph_ate_tail_failed += 1
            return -1
        self.counters.pers_ate_eph_failed += 1
        if self.writeback is None:
            return -1
        written = 0
        while self._writeback_unit():
            written += 1
            if written % batch == 0:
                h = alloc(size, cls) if keeps_lru else self._compact_for(size, cls)
                if h >= 0:
                    return h
        return self._compact_for(size, cls)

    def _compact_for(self, size: int, cls: int) -> int:
        """Try to allocate, compacting first if frees since the last compaction left
        room to win back; -1 if there is still none."""
        h = self._alloc(size, cls)
        if h >= 0 or self._frees_total == self._frees_at_compact:
            return h
        self._frees_at_compact = self._frees_total
        if self.allocator.compactable_frames():
            self.allocator.compact(1 << 30)
            h = self._alloc(size, cls)
        return h

    def _victims(self, cls: int, want_bytes: int) -> list[int]:
        """The next reclaim unit of ``cls``, off its LRU (zombie): the allocator's own
        (zbud: both buddies of the LRU frame), else LRU pages worth ``want_bytes``."""
        pt = self.pages
        victims = self.allocator.lru_victims(cls)
        if victims:
            for h in victims:
                if pt.flags[h] & P_ZOMBIE:
                    continue
                pt.unlink(h, pt.list_of(h))
                pt.flags[h] |= P_ZOMBIE
                self.zombie_pages += 1
            return victims
        out: list[int] = []
        got = 0
        while got < want_bytes:
            h = pt.head[cls]
            if h == NIL:
                break
            pt.unlink(h, cls)
            pt.flags[h] |= P_ZOMBIE
            self.zombie_pages += 1
            out.append(h)
            start, end = self._span(h)
            got += end - start
        return out

    def _drop_entry(self, h: int) -> tuple[Pool, Oid, int] | None:
        """Unmap the tmem handle of page ``h`` (it stays allocated); its key, or None."""
        pt = self.pages
        obj = self.tmem.obj(pt.obj[h])
        if obj is None or obj.slot(pt.idx[h]) != h:
            return None
        index = pt.idx[h]
        obj.pop(index)
        self.tmem.drop_if_empty(obj)
        return obj.pool, obj.oid, index

    def _evict_eph_unit(self) -> bool:
        """Evict one reclaim unit of ephemeral pages (flushing their tmem entries)."""
        victims = self._victims(EPH, PAGE_SIZE)
        if not victims:
            return False
        for h in victims:
            if self.pages.flags[h] & P_LIVE:
                self._drop_entry(h)
                self._release(h)
        self.allocator.note_evicted(EPH)
        self.counters.evicted_eph_zpages += len(victims)
        self.counters.evicted_eph_pageframes += 1
        return True

    def evict_ephemeral(self, frames: int = 1) -> int:
        """Evict LRU ephemeral pages until ``frames`` frames went back to the budget (a
        shrinker), or no ephemeral page is left; returns the frames freed."""
        start = self.arena.frames_used
        evicted = 0
        while start - self.arena.frames_used < frames:
            if not self._evict_eph_unit():
                if self.allocator.compactable_frames():
                    self.allocator.compact(1 << 30)
                break
            evicted += 1
            if not evicted & 15 and self.allocator.compactable_frames() >= frames:
                self.allocator.compact(1 << 30)
        return max(0, start - self.arena.frames_used)

    def _writeback_unit(self) -> bool:
        """Write one reclaim unit of LRU persistent pages back; False if none or the
        target took none of them."""
        assert self.writeback is not None
        victims = self._victims(PERS, PAGE_SIZE)
        if not victims:
            return False
        taken = 0
        pt = self.pages
        for h in victims:
            if not pt.flags[h] & P_LIVE:
                continue
            obj = self.tmem.obj(pt.obj[h])
            index = pt.idx[h]
            if obj is None or obj.slot(index) != h:
                continue
            if self._write_back(obj.pool, obj.oid, index, self._read(h)):
                self._release(h)
                taken += 1
            else:
                self._unzombify(h)
        return taken > 0

    def _write_back(self, pool: Pool, oid: Oid, index: int, page: bytes) -> bool:
        """Hand one page to the writeback target and, if it took the page, drop the
        tmem entry (the caller frees the storage). False if the target refused it."""
        assert self.writeback is not None
        if not self.writeback.write_back(pool.pool_id, oid, index, page):
            self.counters.writeback_failed += 1
            return False
        self.tmem.remove(pool, oid, index)
        self.counters.writtenback_pages += 1
        return True

    def _unzombify(self, h: int) -> None:
        pt = self.pages
        f = pt.flags[h]
        if f & (P_LIVE | P_ZOMBIE) != P_LIVE | P_ZOMBIE:
            return
        pt.flags[h] = f & ~P_ZOMBIE
        self.zombie_pages -= 1
        pt.append(h, pt.list_of(h))
        self.allocator.restore(h)

    def _read(self, h: int) -> bytes:
        """The page stored under handle ``h``, decompressed."""
        start, end = self._span(h)
        codec = self.pages.flags[h] & CODEC_MASK
        try:
            if codec == C_MAIN:
                return self._decompress(self._mm[start:end])
            if codec == C_RAW:
                return bytes(self._mm[start:end])
            assert self.strong is not None
            return self.strong.decompress(self._mm[start:end])
        except Exception as exc:  # a corrupt page must never pass as data
            raise TmemError(f"stored page failed to decompress: {exc}") from exc

    def _read_pampd(self, pampd: int) -> bytes:
        if pampd < 0:
            return (-1 - pampd).to_bytes(8, "little") * (PAGE_SIZE // 8)
        return self._read(pampd)

    # ---- put -------------------------------------------------------------------------

    def put(
        self,
        pool_id: PoolIdArg,
        oid: OidArg,
        index: IndexArg,
        page: PageArg,
        *,
        client: int = LOCAL_CLIENT,
    ) -> bool:
        """Store a 4096-byte page under ``(pool, oid, index)``; False if not stored.

        A page that was not stored leaves no older copy behind; :meth:`put_status` says
        why. This is the hot path: it is flat on purpose.
        """
        pool = self._local.get(pool_id) if type(pool_id) is int and client == LOCAL_CLIENT else None
        if pool is None:
            pool = self.tmem.pool(pool_id, client)
        try:
            size = len(page)
        except TypeError:
            raise PageSizeError(
                f"page must be a bytes-like object, got {type(page).__name__}"
            ) from None
        if size != PAGE_SIZE:
            raise PageSizeError(f"page must be {PAGE_SIZE} bytes, got {size}")
        try:
            obj = pool.objects.get(oid)
        except TypeError:
            raise InvalidHandleError(f"oid must be a tuple of three ints, got {oid!r}") from None
        if obj is None:
            check_oid(oid)
        if type(index) is not int or not 0 <= index <= U32_MAX:
            check_index(index)
        persistent = pool.persistent
        if persistent and self.compress_behind and self.arena.frames_free > self.stage_reserve:
            try:
                view = memoryview(page).cast("B")
            except TypeError:
                raise PageSizeError(
                    f"page must be a bytes-like object, got {type(page).__name__}"
                ) from None
            if len(view) != PAGE_SIZE:
                raise PageSizeError(f"page must be {PAGE_SIZE} bytes, got {len(view)}")
            self._stage(pool, oid, index, view, 1)
            return True
        try:
            data = self._compress(page)
        except TypeError:
            raise PageSizeError(
                f"page must be a bytes-like object, got {type(page).__name__}"
            ) from None
        clen = len(data)
        codec = C_MAIN
        if clen <= SAME_FILLED_PROBE:
            pattern = _fill_pattern(page)
            if pattern is not None:
                self._put_same_filled(pool, oid, index, pattern)
                return True
        elif clen > PERS_MAX_ZSIZE and self._rejects(persistent, clen):
            if not (persistent and self.huge_pages):
                self._flush_quietly(pool, oid, index)
                self._why = PutResult.POOR_COMPRESSION
                return False
            data = bytes(page)
            clen = PAGE_SIZE
            codec = C_RAW
            self.counters.huge_pages_stored += 1
        cls = PERS if persistent else EPH
        h = self._alloc(clen, cls)
        if h < 0:
            h = self._alloc_slow(clen, cls)
            if h < 0:
                self._no_memory(pool, oid, index)
                return False
            obj = pool.objects.get(oid)  # reclaim may have flushed this object's pages
        start, end = self._span(h)
        self._mm[start:end] = data
        self._record(h, cls, codec, clen, pool, oid, index, obj)
        return True

    def _record(
        self,
        h: int,
        cls: int,
        codec: int,
        size: int,
        pool: Pool,
        oid: Oid,
        index: int,
        obj: Obj | None,
    ) -> None:
        """Note page ``h`` (written) in the page table, on its LRU, and in tmem (an
        older page under the handle is freed)."""
        if obj is None:
            obj = self.tmem.obj_for_put(pool, oid)
        pt = self.pages
        if h >= pt.cap:
            pt.grow(h)
        pt.obj[h] = obj.num
        pt.idx[h] = index
        pt.flags[h] = P_LIVE | cls << 1 | codec
        if pt.stamps:
            pt.stamp[h] = pt.now()
        pt.append(h, cls)
        self.zpages[cls] += 1
        self.zbytes[cls] += size
        if codec == C_RAW:
            self.raw_pages += 1
        old = obj.set_handle(index, h)
        if old != EMPTY:
            self.free(pool, oid, index, old if old >= 0 else obj.decode_old(index, old))
        self._puts_since_charge += 1
        if self._puts_since_charge >= CHARGE_EVERY:
            self._charge_metadata()

    def put_status(
        self,
        pool_id: PoolIdArg,
        oid: OidArg,
        index: IndexArg,
        page: PageArg,
        *,
        client: int = LOCAL_CLIENT,
    ) -> PutResult:
        """Like :meth:`put`, but say why a page was not stored."""
        if self.put(pool_id, oid, index, page, client=client):
            return PutResult.STORED
        return self._why

    def _rejects(self, persistent: bool, clen: int) -> bool:
        """Is a page of ``clen`` compressed bytes too poorly compressible (and count it)?"""
        if clen > (PERS_MAX_ZSIZE if persistent else EPH_MAX_ZSIZE):
            self.counters.compress_poor += 1
            return True
        mean = self.allocator.max_mean_size
        if persistent and clen > mean and self._pers_mean_too_high(mean):
            self.counters.mean_compress_poor += 1
            return True
        return False

    def _pers_mean_too_high(self, mean: int) -> bool:
        """The mean compressed size of persistent pages is over ``mean`` (zbud, whose
        pages must pair). Raw (huge and staged) pages are left out: they take no part in
        pairing, and counting them would reject ever more pages, stored raw too."""
        raw = self.raw_pages
        zpages = self.zpages[PERS] - raw + self.same_filled[PERS]
        zbytes = self.zbytes[PERS] - raw * PAGE_SIZE
        return zpages > 0 and zbytes > mean * zpages

    def _no_memory(self, pool: Pool, oid: OidArg, index: IndexArg) -> None:
        """A put found no room: count it and drop any older copy under the handle."""
        if pool.persistent:
            self.counters.failed_pers_puts += 1
        else:
            self.counters.failed_eph_puts += 1
        self._flush_quietly(pool, oid, index)
        self._why = PutResult.NO_MEMORY

    def _flush_quietly(self, pool: Pool, oid: OidArg, index: IndexArg) -> None:
        """Drop an older copy after a failed put (coherency: never return stale data)."""
        obj = pool.objects.get(oid)
        if obj is not None and obj.slot(index) != EMPTY:
            self.tmem.flush_page(pool, oid, index)

    def _put_same_filled(self, pool: Pool, oid: Oid, index: int, pattern: int) -> None:
        self.tmem.put(pool, oid, index, -1 - pattern)
        self.same_filled[pool.persistent] += 1
        self.counters.same_filled_pages_total += 1
        if pattern == 0:
            self.counters.zero_filled_pages += 1
            self.counters.zero_filled_pages_max = max(
                self.counters.zero_filled_pages_max, self.counters.zero_filled_pages
            )

    # ---- compress-behind ---------------------------------------------------------------

    def _stage(self, pool: Pool, oid: Oid, index: int, pages: memoryview, count: int) -> None:
        """Store ``count`` persistent pages raw, for :meth:`compact` to compress; the
        caller checked the arguments and that enough frames are free.

        Same-filled pages (zero pages above all) are stored as their pattern at once
        when the C helper is there to find them for next to nothing.
        """
        fills = find_fills(pages) if find_fills is not None else None
        if not fills:
            self._stage_raw(pool, oid, index, pages, count)
            return
        pos = 0
        for j in range(0, len(fills), 2):
            k = fills[j]
            if k > pos:
                run = pages[pos * PAGE_SIZE : k * PAGE_SIZE]
                self._stage_raw(pool, oid, index + pos, run, k - pos)
            self._put_same_filled(pool, oid, index + k, fills[j + 1])
            pos = k + 1
        if pos < count:
            self._stage_raw(pool, oid, index + pos, pages[pos * PAGE_SIZE :], count - pos)

    def _stage_raw(self, pool: Pool, oid: Oid, index: int, pages: memoryview, count: int) -> None:
        pt = self.pages
        mm = self._mm
        obj = self.tmem.obj_for_put(pool, oid)
        for i in range(count):
            h = self._alloc(PAGE_SIZE, PERS)
            if h < 0:  # the reserve said there was room: never expected
                raise TmemError("compress-behind found no frame for a staged page")
            start = self._span(h)[0]
            pos = i * PAGE_SIZE
            mm[start : start + PAGE_SIZE] = pages[pos : pos + PAGE_SIZE]
            if h >= pt.cap:
                pt.grow(h)
            pt.obj[h] = obj.num
            pt.idx[h] = index + i
            pt.flags[h] = P_LIVE | P_PERS | P_STAGED | C_RAW
            if pt.stamps:
                pt.stamp[h] = pt.now()
            pt.append(h, L_STAGED)
            self.zpages[PERS] += 1
            self.zbytes[PERS] += PAGE_SIZE
            self.raw_pages += 1
            old = obj.set_handle(index + i, h)
            if old != EMPTY:
                old_pampd = old if old >= 0 else obj.decode_old(index + i, old)
                self.free(pool, oid, index + i, old_pampd)
        self.counters.staged_pages_total += count
        self._puts_since_charge += count
        if self._puts_since_charge >= CHARGE_EVERY:
            self._charge_metadata()

    @property
    def staged_pages(self) -> int:
        """Pages stored raw by compress-behind that :meth:`compact` has not reached yet."""
        return self.pages.count[L_STAGED]

    def compact(self, max_pages: int = 64) -> int:
        """Compress up to ``max_pages`` staged pages, oldest first; return how many.

        Each page is compressed and stored like a normal put, or stays raw as a huge
        page when it compresses poorly (with a writeback target and no huge pages, it is
        written back instead). Call it when idle; puts call it themselves when they need
        room.
        """
        done = 0
        pt = self.pages
        while done < max_pages:
            h = pt.head[L_STAGED]
            if h == NIL:
                break
            self._compact_page(h)
            done += 1
        return done

    def _compact_page(self, h: int) -> None:
        pt = self.pages
        obj = self.tmem.obj(pt.obj[h])
        index = pt.idx[h]
        assert obj is not None and obj.slot(index) == h, "a staged page lost its tmem entry"
        pool, oid = obj.pool, obj.oid
        start, end = self._span(h)
        page = bytes(self._mm[start:end])
        data = self._compress(page)
        clen = len(data)
        self.counters.compacted_pages += 1
        if clen <= SAME_FILLED_PROBE:
            pattern = _fill_pattern(page)
            if pattern is not None:
                self._put_same_filled(pool, oid, index, pattern)  # frees the raw page
                return
        if clen > PERS_MAX_ZSIZE and self._rejects(True, clen):
            if (
                not self.huge_pages
                and self.writeback is not None
                and self._write_back(pool, oid, index, page)
            ):
                self._release(h)
                return
            pt.unlink(h, L_STAGED)  # accepted pages are kept: raw, as a huge page
            pt.flags[h] &= ~P_STAGED
            pt.append(h, L_PERS)
            self.counters.huge_pages_stored += 1
            return
        self._move(h, data, C_MAIN, page)

    def _move(self, h: int, data: bytes, codec: int, raw_page: bytes | None = None) -> bool:
        """Store page ``h`` anew as ``data`` (codec ``codec``) under a new handle, in its
        place on its list (a staged page goes to the end of the persistent LRU).

        Without ``raw_page``: False (nothing changed) when there is no room beside the
        old copy. With it (the page itself, compress-behind): the old copy is freed
        first when room is short, and the page is stored raw if even then ``data``
        finds none; it always succeeds.
        """
        pt = self.pages
        f = pt.flags[h]
        cls = (f & P_PERS) >> 1
        old_start, old_end = self._span(h)
        old_size = old_end - old_start
        size = len(data)
        new = self._alloc(size, cls)
        freed = False
        if new < 0:
            if raw_page is None:
                return False
            # Free the old copy and store the page again in its room. Metadata may have
            # been charged the frame meanwhile (limit below use): lend it back for this
            # page, which already had it.
            self.allocator.free(h)
            freed = True
            arena = self.arena
            limit = arena.limit
            arena.limit = min(arena.frames_total, max(limit, arena.frames_used + 1))
            try:
                new = self._alloc(size, cls)
                if new < 0:  # no room for it compressed: keep it raw
                    data, size, codec = raw_page, PAGE_SIZE, C_RAW
                    new = self._alloc(PAGE_SIZE, cls)
            finally:
                arena.limit = limit
            if new < 0:
                raise TmemError("no frame for a page whose own frame was just freed")
        start, end = self._span(new)
        self._mm[start:end] = data
        if new >= pt.cap:
            pt.grow(new)
        obj_num, index = pt.obj[h], pt.idx[h]
        pt.obj[new] = obj_num
        pt.idx[new] = index
        pt.flags[new] = (f & ~(CODEC_MASK | P_STAGED)) | codec
        if pt.stamps:
            pt.stamp[new] = pt.stamp[h]
        if f & P_STAGED:
            pt.unlink(h, L_STAGED)
            pt.append(new, cls)
        else:
            pt.substitute(h, new, cls)
        self.zbytes[cls] += size - old_size
        if f & CODEC_MASK == C_RAW:
            self.raw_pages -= 1
        if codec == C_RAW:
            self.raw_pages += 1
        if h != new:
            pt.flags[h] = 0
            pt.obj[h] = NIL
        obj = self.tmem.obj(obj_num)
        assert obj is not None
        obj.set_handle(index, new)
        if not freed:
            self.allocator.free(h)
        return True

    def put_run(
        self,
        pool_id: PoolIdArg,
        oid: OidArg,
        first_index: IndexArg,
        data: PageArg,
        *,
        client: int = LOCAL_CLIENT,
    ) -> int:
        """Store the pages of ``data`` (whole pages) at ``first_index``, ``first_index + 1``,
        ... of one object; return how many were stored before the first that was not
        (:attr:`last_refusal` says why; the caller continues after it).

        One call per run of pages, sliced from the caller's buffer without copying: the
        block device's write path.
        """
        view = memoryview(data)
        if view.itemsize != 1 or len(view) % PAGE_SIZE:
            raise PageSizeError(f"a run must be whole {PAGE_SIZE}-byte pages, got {len(view)}")
        n = len(view) // PAGE_SIZE
        pool = self._pool(pool_id, client)
        if (
            pool.persistent
            and self.compress_behind
            and self.arena.frames_free - n >= self.stage_reserve
            and n
        ):
            check_oid(oid)
            check_index(first_index)
            check_index(first_index + n - 1)
            self._stage(pool, oid, first_index, view, n)
            return n
        if type(first_index) is not int:
            check_index(first_index)
        put = self.put
        for i in range(n):
            pos = i * PAGE_SIZE
            if not put(pool_id, oid, first_index + i, view[pos : pos + PAGE_SIZE], client=client):
                return i
        return n

    @property
    def last_refusal(self) -> PutResult:
        """Why the latest put that did not store its page failed."""
        return self._why

    def put_many(
        self, pool_id: PoolIdArg, items: Iterable[tuple[OidArg, IndexArg, PageArg]]
    ) -> list[bool]:
        """Batch put: one result per ``(oid, index, page)``, in order."""
        put = self.put
        return [put(pool_id, oid, index, page) for oid, index, page in items]

    # ---- get -------------------------------------------------------------------------

    def get(
        self,
        pool_id: PoolIdArg,
        oid: OidArg,
        index: IndexArg,
        free: bool | None = None,
        *,
        client: int = LOCAL_CLIENT,
    ) -> bytes | None:
        """The page under the handle, or None.

        Ephemeral pools: always exclusive (a hit removes the page). Persistent pools:
        the page stays unless ``free=True``. A page living on another node raises
        :class:`RemotePageError` (the cluster layer fetches it).
        """
        pool = self._local.get(pool_id) if type(pool_id) is int and client == LOCAL_CLIENT else None
        if pool is None:
            pool = self.tmem.pool(pool_id, client)
        try:
            obj = pool.objects.get(oid)
        except TypeError:
            raise InvalidHandleError(f"oid must be a tuple of three ints, got {oid!r}") from None
        if obj is None:
            check_oid(oid)
            check_index(index)
            self.counters.failed_gets += 1
            return None
        if type(index) is not int or not 0 <= index <= U32_MAX:
            check_index(index)
        h = obj.slot(index)
        if h >= 0:
            start, end = self._span(h)
            codec = self.pages.flags[h] & CODEC_MASK
            if codec == C_MAIN:
                try:
                    data = self._decompress(self._mm[start:end])
                except Exception as exc:  # a corrupt page must never pass as data
                    raise TmemError(f"stored page failed to decompress: {exc}") from exc
            else:
                data = self._read(h)
            if free or not pool.persistent:
                obj.pop(index)
                self.tmem.drop_if_empty(obj)
                self._release(h)
            return data
        if h == EMPTY:
            self.counters.failed_gets += 1
            return None
        pampd = obj.get(index)
        if type(pampd) is not int:
            raise RemotePageError(pampd)
        data = self._read_pampd(pampd)
        if free or not pool.persistent:
            obj.pop(index)
            self.tmem.drop_if_empty(obj)
            self.free(pool, oid, index, pampd)
        return data

    def read_run(
        self,
        pool_id: PoolIdArg,
        oid: OidArg,
        first_index: IndexArg,
        count: int,
        *,
        client: int = LOCAL_CLIENT,
    ) -> tuple[bytearray, list[int]]:
        """Non-exclusive gets of ``count`` consecutive indexes of one object of a
        persistent pool (a block device read), as one buffer of ``count`` pages.

        Returns ``(pages, missing)``: ``missing`` lists the positions (0-based) the pool
        has no page for; they read as zeros in ``pages``. They are not counted as
        ``failed_gets``: only the caller can tell a hole (a block never written) from a
        page kept in a lower tier. With the lz4 extension the run is decompressed
        straight out of the arena in one call. A page living on another node raises
        :class:`RemotePageError`, as :meth:`get` does.
        """
        pool = self._pool(pool_id, client)
        if not pool.persistent:
            raise TmemError("read_run reads persistent pools (ephemeral gets are exclusive)")
        check_index(first_index)
        if type(count) is not int or not 0 <= count <= U32_MAX - first_index + 1:
            raise InvalidHandleError(f"bad page count {count!r}")
        try:
            obj = pool.objects.get(oid)
        except TypeError:
            raise InvalidHandleError(f"oid must be a tuple of three ints, got {oid!r}") from None
        if obj is None:
            check_oid(oid)
            return bytearray(count * PAGE_SIZE), list(range(count))
        slots = obj.run(first_index, count)
        missing: list[int] = []
        gather = self._gather
        flags = self.pages.flags
        span = self._span
        if gather is None:  # one decompress per page
            out = bytearray(count * PAGE_SIZE)
            for i, h in enumerate(slots):
                if h == EMPTY:
                    missing.append(i)
                    continue
                if h < EMPTY:
                    pampd = obj.get(first_index + i)
                    if type(pampd) is not int:
                        raise RemotePageError(pampd)
                    h = pampd
                out[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = self._read_pampd(h)
            return out, missing
        spans: list[int] = []  # [start, length] per page for gather()
        later: list[int] = []  # positions stored with the strong codec: read one by one
        for i, h in enumerate(slots):
            if h >= 0:
                start, end = span(h)
                codec = flags[h] & CODEC_MASK
                if codec == C_STRONG:
                    later.append(i)
                    spans.append(0)
                    spans.append(-1)
                else:  # length PAGE_SIZE: a raw page, copied as it is
                    spans.append(start)
                    spans.append(end - start)
            elif h == EMPTY:
                missing.append(i)
                spans.append(0)
                spans.append(-1)
            else:
                pampd = obj.get(first_index + i)
                if type(pampd) is not int:
                    raise RemotePageError(pampd)
                spans.append(-1 - pampd)  # same-filled: the 8-byte pattern
                spans.append(0)
        try:
            out = gather(self._mm, spans)
        except ValueError as exc:  # a corrupt page must never pass as data
            raise TmemError(f"stored page failed to decompress: {exc}") from exc
        for i in later:
            out[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = self._read(slots[i])
        return out, missing

    def get_many(
        self, pool_id: PoolIdArg, keys: Iterable[tuple[OidArg, IndexArg]], free: bool | None = None
    ) -> list[bytes | None]:
        """Batch get: one page or None per ``(oid, index)``, in order."""
        get = self.get
        return [get(pool_id, oid, index, free) for oid, index in keys]

    # ---- flush -----------------------------------------------------------------------

    def flush_page(
        self, pool_id: PoolIdArg, oid: OidArg, index: IndexArg, *, client: int = LOCAL_CLIENT
    ) -> bool:
        """Drop the page under the handle; True if there was one."""
        pool = self._pool(pool_id, client)
        check_oid(oid)
        check_index(index)
        self.counters.flush_total += 1
        if self.tmem.flush_page(pool, oid, index):
            self.counters.flush_found += 1
            return True
        return False

    def flush_object(self, pool_id: PoolIdArg, oid: OidArg, *, client: int = LOCAL_CLIENT) -> int:
        """Drop every page of the object; returns how many there were."""
        pool = self._pool(pool_id, client)
        check_oid(oid)
        self.counters.flobj_total += 1
        count = self.tmem.flush_object(pool, oid)
        if count:
            self.counters.flobj_found += 1
        return count

    # ---- hooks for writeback and RAMster ---------------------------------------------

    def lookup(
        self, pool_id: PoolIdArg, oid: OidArg, index: IndexArg, *, client: int = LOCAL_CLIENT
    ) -> Pampd | None:
        """The raw pampd under the handle (int = local, other = remote), or None."""
        return self.tmem.lookup(self._pool(pool_id, client), check_oid(oid), check_index(index))

    def _stored_form(self, h: int) -> tuple[bytes, bool]:
        """Page ``h`` as peers take it: compressed with this Zcache's compressor, or raw
        (``False``): a recompressed page goes out in the compressor's form."""
        start, end = self._span(h)
        codec = self.pages.flags[h] & CODEC_MASK
        if codec == C_MAIN:
            return bytes(self._mm[start:end]), True
        if codec == C_RAW:
            return bytes(self._mm[start:end]), False
        data = self._compress(self._read(h))
        return (data, True) if len(data) <= PERS_MAX_ZSIZE else (self._read(h), False)

    def zombify_lru(self, persistent: bool) -> list[ZombiePage]:
        """Hand out the LRU pages of a class (a frame's worth) for writeback or remotify.

        They leave the LRU; they stay readable until replaced (:meth:`replace`) or
        flushed, and then their storage is freed. :meth:`unzombify` undoes it. [] if
        none.
        """
        out: list[ZombiePage] = []
        pt = self.pages
        for h in self._victims(PERS if persistent else EPH, PAGE_SIZE):
            obj = self.tmem.obj(pt.obj[h])
            if obj is None or obj.slot(pt.idx[h]) != h:
                continue
            data, compressed = self._stored_form(h)
            pool = obj.pool
            out.append(
                ZombiePage(
                    pool.client, pool.pool_id, obj.oid, pt.idx[h], data, compressed, h, persistent
                )
            )
        return out

    def unzombify(self, page: ZombiePage) -> None:
        """Give a zombie page back to the LRU (e.g. the peer refused the page)."""
        h = page.pampd
        if 0 <= h < self.pages.cap:
            obj = self.tmem.obj(self.pages.obj[h])
            if obj is not None and obj.slot(page.index) == h and obj.oid == page.oid:
                self._unzombify(h)

    def replace(
        self,
        pool_id: PoolIdArg,
        oid: OidArg,
        index: IndexArg,
        pampd: Pampd,
        *,
        client: int = LOCAL_CLIENT,
        expected: ZombiePage | None = None,
    ) -> bool:
        """Install a remote ``pampd`` for the handle (RAMster remotify).

        With ``expected``, only if the handle still maps to that zombie page (a newer put
        or a flush since the zombify wins). The local copy is freed.
        """
        if type(pampd) is int:
            raise InvalidHandleError("replace installs remote (non-int) pampds only")
        pool = self._pool(pool_id, client)

        def still_current(current: Pampd) -> bool:
            if expected is None:
                return True
            h = expected.pampd
            return current == h and 0 <= h < self.pages.cap and bool(self.pages.flags[h] & P_ZOMBIE)

        if self.tmem.replace(pool, check_oid(oid), check_index(index), pampd, still_current):
            self.remote_pages[pool.persistent] += 1
            return True
        return False

    def install_remote(
        self,
        pool_id: PoolIdArg,
        oid: OidArg,
        index: IndexArg,
        pampd: Pampd,
        *,
        client: int = LOCAL_CLIENT,
    ) -> None:
        """Map a handle to a remote pampd directly (e.g. a re-replicated page)."""
        if type(pampd) is int:
            raise InvalidHandleError("install_remote takes remote (non-int) pampds only")
        pool = self._pool(pool_id, client)
        self.tmem.put(pool, check_oid(oid), check_index(index), pampd)
        self.remote_pages[pool.persistent] += 1

    def remove_entry(
        self, pool_id: PoolIdArg, oid: OidArg, index: IndexArg, *, client: int = LOCAL_CLIENT
    ) -> Pampd | None:
        """Unmap a handle and free its local storage, without calling remote hooks.

        For the cluster layer, which handles the remote side of a remote pampd itself.
        """
        pool = self._pool(pool_id, client)
        pampd = self.tmem.remove(pool, check_oid(oid), check_index(index))
        if pampd is None:
            return None
        if type(pampd) is int:
            self.free(pool, oid, index, pampd)
        else:
            self.remote_pages[pool.persistent] -= 1
        return pampd

    def put_compressed(
        self,
        pool_id: PoolIdArg,
        oid: OidArg,
        index: IndexArg,
        data: bytes,
        *,
        client: int = LOCAL_CLIENT,
        compressed: bool = True,
    ) -> PutResult:
        """Store a page already compressed with this Zcache's compressor (raw put).

        For foreign pages of a RAMster peer: no recompression. ``compressed=False``
        with a 4096-byte ``data`` stores a raw page (a huge page, or a decompressed one).
        """
        if not compressed:
            return self.put_status(pool_id, oid, index, data, client=client)
        pool = self._pool(pool_id, client)
        check_oid(oid)
        check_index(index)
        clen = len(data)
        limit = PERS_MAX_ZSIZE if pool.persistent else EPH_MAX_ZSIZE
        if clen > limit or clen < 1:
            self.counters.compress_poor += 1
            self._flush_quietly(pool, oid, index)
            return PutResult.POOR_COMPRESSION
        cls = PERS if pool.persistent else EPH
        h = self._alloc(clen, cls)
        if h < 0:
            h = self._alloc_slow(clen, cls)
            if h < 0:
                self._no_memory(pool, oid, index)
                return PutResult.NO_MEMORY
        start, end = self._span(h)
        self._mm[start:end] = data
        self._record(h, cls, C_MAIN, clen, pool, oid, index, pool.objects.get(oid))
        return PutResult.STORED

    def get_compressed(
        self,
        pool_id: PoolIdArg,
        oid: OidArg,
        index: IndexArg,
        free: bool | None = None,
        *,
        client: int = LOCAL_CLIENT,
    ) -> tuple[bytes, bool] | None:
        """The stored form ``(data, compressed)`` of a local page, or None (raw get).

        Same-filled pages come back decompressed (``compressed=False``).
        """
        out = self.get_compressed_many(pool_id, [(oid, index)], free, client=client)
        return out[0]

    def get_compressed_many(
        self,
        pool_id: PoolIdArg,
        keys: Iterable[tuple[OidArg, IndexArg]],
        free: bool | None = None,
        *,
        client: int = LOCAL_CLIENT,
    ) -> list[tuple[bytes, bool] | None]:
        """Batch :meth:`get_compressed` for one pool: one result per ``(oid, index)``.

        ``free=None`` means exclusive for ephemeral pools, as :meth:`get`.
        """
        pool = self._pool(pool_id, client)
        remove = free or (free is None and not pool.persistent)
        out: list[tuple[bytes, bool] | None] = []
        for oid, index in keys:
            check_oid(oid)
            check_index(index)
            pampd = self.tmem.lookup(pool, oid, index)
            if pampd is None:
                out.append(None)
                continue
            if type(pampd) is not int:
                raise RemotePageError(pampd)
            if pampd < 0:
                out.append((self._read_pampd(pampd), False))
            else:
                out.append(self._stored_form(pampd))
            if remove:
                self.tmem.remove(pool, oid, index)
                self.free(pool, oid, index, pampd)
        return out

    def decompress(self, data: bytes) -> bytes:
        """Decompress a stored page (e.g. one that came back from a peer)."""
        return self._decompress(data)

    # ---- background work: recompression, compaction -----------------------------------

    def recompress(self, max_pages: int = 64, *, now: float | None = None) -> int:
        """Recompress up to ``max_pages`` pages idle for ``recompress_after`` seconds
        with the strong codec (zram's recompress, done for you); returns pages looked at.

        Walks each class's LRU from the oldest page (put order), from where the last
        call stopped; pages younger than the idle age end the walk. A page is kept in
        the strong form only when that saves at least RECOMPRESS_MIN_GAIN bytes, and only
        where there is room beside the old copy: recompression never evicts. Call it
        when idle; each call is short, so clients never wait long behind it.
        """
        strong = self.strong
        if strong is None:
            return 0
        pt = self.pages
        limit = int((pt.now() if now is None else now) - self.recompress_after)
        looked = 0
        for lst in (L_PERS, L_EPH):
            h = pt.cursor[lst]
            while h != NIL and looked < max_pages:
                if pt.stamp[h] > limit:
                    break
                looked += 1
                nxt = pt.next[h]
                if pt.flags[h] & CODEC_MASK == C_MAIN:
                    self._recompress_one(h, strong)
                pt.cursor[lst] = nxt
                h = nxt
        return looked

    def _recompress_one(self, h: int, strong: Compressor) -> None:
        start, end = self._span(h)
        old_size = end - start
        page = self._read(h)
        data = strong.compress(page)
        if len(data) + RECOMPRESS_MIN_GAIN > old_size or not self._move(h, data, C_STRONG):
            self.counters.recompress_skipped += 1
            return
        self.counters.recompressed_pages += 1
        self.counters.recompress_saved_bytes += old_size - len(data)

    @property
    def recompress_pending(self) -> bool:
        """Is there a page the recompressor has not looked at yet (young or not)?"""
        return self.strong is not None and (
            self.pages.cursor[L_PERS] != NIL or self.pages.cursor[L_EPH] != NIL
        )

    def compact_all(self) -> int:
        """Compress every staged page, recompress every idle page, compact the
        allocator and give resident free frames back to the OS; returns the frames the
        allocator compaction freed."""
        while self.compact(4096):
            pass
        while self.recompress(4096) == 4096:
            pass
        return self.compact_allocator()

    def compact_allocator(self, max_moves: int = 1 << 30) -> int:
        """Move objects out of sparse frames (zsmalloc) so whole frames go back to the
        budget and the OS; returns the frames freed."""
        before = self.arena.frames_used
        if self.allocator.compactable_frames():
            self.allocator.compact(max_moves)
        self.arena.release_free()
        return max(0, before - self.arena.frames_used)

    def idle_work(self, max_pages: int = 256) -> bool:
        """One short step of background work for a caller with nothing else to do:
        compress staged pages, then recompress idle pages, then compact when enough
        frames would come back. True if there may be more to do."""
        if self.pages.count[L_STAGED]:
            self.compact(max_pages)
            return True
        if self.strong is not None and self.recompress(max_pages):
            return True
        if self.allocator.compactable_frames() > max(16, self.arena.frames_used // 32):
            self.allocator.compact(max_pages)
            return True
        return False

    # ---- stats -----------------------------------------------------------------------

    def metadata_bytes(self) -> int:
        """Bytes of bookkeeping outside the frames: the page table, the allocator's
        columns, the tmem index and the arena's free lists."""
        return self._metadata_estimate()

    def stats_steps(self, pages_per_step: int = 32768) -> Iterator[dict[str, int | float] | None]:
        """:meth:`stats` for callers that must not stall (kept for servers that yield
        between steps): the stats cost no walk over pages now, so there is one step."""
        yield self.stats()

    def stats(self) -> dict[str, int | float]:
        """Every zcache counter (kernel debugfs names), the allocator's own, and a
        zram-style summary."""
        c = self.counters
        eph_zpages = self.zpages[EPH] + self.same_filled[EPH]
        pers_zpages = self.zpages[PERS] + self.same_filled[PERS]
        out: dict[str, int | float] = {
            # zcache (section 4.11)
            "obj_count": self.tmem.object_count(),
            "flush_total": c.flush_total,
            "flush_found": c.flush_found,
            "flobj_total": c.flobj_total,
            "flobj_found": c.flobj_found,
            "failed_eph_puts": c.failed_eph_puts,
            "failed_pers_puts": c.failed_pers_puts,
            "failed_getfreepages": c.failed_getfreepages,
            "compress_poor": c.compress_poor,
            "mean_compress_poor": c.mean_compress_poor,
            "eph_ate_tail": c.eph_ate_tail,
            "eph_ate_tail_failed": c.eph_ate_tail_failed,
            "pers_ate_eph": c.pers_ate_eph,
            "pers_ate_eph_failed": c.pers_ate_eph_failed,
            "evicted_eph_zpages": c.evicted_eph_zpages,
            "evicted_eph_pageframes": c.evicted_eph_pageframes,
            "eph_zpages": eph_zpages,
            "pers_zpages": pers_zpages,
            "eph_zbytes": self.zbytes[EPH],
            "pers_zbytes": self.zbytes[PERS],
            "zero_filled_pages": c.zero_filled_pages,
            "zero_filled_pages_max": c.zero_filled_pages_max,
            "same_filled_pages": self.same_filled[EPH] + self.same_filled[PERS],
            "huge_pages": self.raw_pages - self.pages.count[L_STAGED],
            "huge_pages_stored": c.huge_pages_stored,
            "staged_pages": self.pages.count[L_STAGED],
            "staged_pages_total": c.staged_pages_total,
            "compacted_pages": c.compacted_pages,
            "same_filled_pages_total": c.same_filled_pages_total,
            "writtenback_pages": c.writtenback_pages,
            "writeback_failed": c.writeback_failed,
            "failed_gets": c.failed_gets,
            "remote_eph_pages": self.remote_pages[EPH],
            "remote_pers_pages": self.remote_pages[PERS],
            "zombie_pages": self.zombie_pages,
            "recompressed_pages": c.recompressed_pages,
            "recompress_saved_bytes": c.recompress_saved_bytes,
            "recompress_skipped": c.recompress_skipped,
            "strong_pages": self._strong_pages(),
        }
        out.update(self.allocator.stats())
        stored_pages = eph_zpages + pers_zpages
        metadata = self._metadata_estimate()
        # What the process holds for the store: every resident arena page (free frames
        # kept resident included; a prefaulted arena is resident whole) + metadata.
        resident = self.arena.resident_bytes()
        holding = self.arena.frames_used * PAGE_SIZE + metadata
        out.update(
            {
                "frames_total": self.arena.frames_total,
                "frames_free": self.arena.frames_free,
                "frames_used": self.arena.frames_used,
                "frames_limit": self.arena.limit,
                "memory_budget": self.budget,
                "stored_pages": stored_pages,
                "orig_data_size": stored_pages * PAGE_SIZE,
                "compr_data_size": self.zbytes[EPH] + self.zbytes[PERS],
                "metadata_bytes": metadata,
                "arena_resident_bytes": resident,
                "mem_used_total": resident + metadata,
                "compression_ratio": (stored_pages * PAGE_SIZE / holding) if holding else 0.0,
                "metadata_bytes_per_page": (metadata / stored_pages) if stored_pages else 0.0,
            }
        )
        return out

    def _strong_pages(self) -> int:
        """Pages stored with the strong codec (a walk of the flags column: stats only)."""
        if self.strong is None:
            return 0
        flags = self.pages.flags
        return sum(1 for h in range(self.pages.cap) if flags[h] & CODEC_MASK == C_STRONG)

    # ---- accounting (tests and debugging; never on the put/get paths) ----------------

    def frame_owners(self) -> list[list[str]]:
        """Who holds each frame of the budget: ``"free"`` if the arena has it free, plus
        the allocator's word for it if the allocator holds it. Built by walking the
        arena and the allocator, not from counters: exactly one owner per frame of the
        arena's used part is the invariant :meth:`check_frames` checks."""
        owners: list[list[str]] = [[] for _ in range(self.arena.frames_total)]
        for frame in self.arena.free_frames_list():
            if 0 <= frame < len(owners):
                owners[frame].append("free")
        for frame, kind in self.allocator.frames_held().items():
            owners[frame].append(kind)
        return owners

    def check_frames(self) -> list[str]:
        """Every way the accounting is broken, as sentences (none: ``[]``).

        * no frame is both free and held, or held twice; the arena's count of used
          frames is what the allocator holds;
        * the arena's and the allocator's own structures agree (their ``check()``);
        * every live page handle is mapped by exactly the tmem entry its columns name,
          and every local tmem entry names a live handle;
        * every live, non-zombie handle is on the list its flags say, once; the
          per-class counts match.

        For tests and debugging: it walks every frame and every stored page.
        """
        problems: list[str] = []
        held = self.allocator.frames_held()
        for frame, owners in enumerate(self.frame_owners()):
            if len(owners) > 1:
                problems.append(f"frame {frame}: held {len(owners)} times: {', '.join(owners)}")
        if len(held) != self.arena.frames_used:
            problems.append(
                f"arena counts {self.arena.frames_used} frames used, "
                f"the allocator holds {len(held)}"
            )
        problems.extend("arena: " + p for p in self.arena.check())
        problems.extend(f"{self.allocator.name}: " + p for p in self.allocator.check())
        pt = self.pages
        mapped: dict[int, tuple[Oid, int]] = {}
        for pool in self.tmem.pools():
            for oid, index, pampd in pool.items():
                if type(pampd) is not int or pampd < 0:
                    continue
                if pampd in mapped:
                    problems.append(f"handle {pampd}: mapped by {mapped[pampd]} and {(oid, index)}")
                mapped[pampd] = (oid, index)
                if not (0 <= pampd < pt.cap and pt.flags[pampd] & P_LIVE):
                    problems.append(f"{(oid, index)} maps to handle {pampd}, which is not live")
                    continue
                obj = self.tmem.obj(pt.obj[pampd])
                if obj is None or obj.oid != oid or obj.pool is not pool or pt.idx[pampd] != index:
                    problems.append(f"handle {pampd}: its columns do not name {(oid, index)}")
        zpages = [0, 0]
        on_lists: dict[int, int] = {}
        for lst in (L_EPH, L_PERS, L_STAGED):
            walked = pt.walk(lst)
            if len(walked) != pt.count[lst]:
                problems.append(f"list {lst}: {len(walked)} linked, counted {pt.count[lst]}")
            for h in walked:
                if h in on_lists:
                    problems.append(f"handle {h}: on lists {on_lists[h]} and {lst}")
                on_lists[h] = lst
        for h in range(pt.cap):
            f = pt.flags[h]
            if not f & P_LIVE:
                if h in on_lists:
                    problems.append(f"handle {h}: not live, but on list {on_lists[h]}")
                continue
            zpages[(f & P_PERS) >> 1] += 1
            if h not in mapped:
                problems.append(f"handle {h}: live, but no tmem entry maps it")
            if f & P_ZOMBIE:
                if h in on_lists:
                    problems.append(f"handle {h}: zombie, but on list {on_lists[h]}")
            elif on_lists.get(h) != pt.list_of(h):
                problems.append(f"handle {h}: on list {on_lists.get(h)}, not {pt.list_of(h)}")
        if zpages != self.zpages:
            problems.append(f"live pages per class {zpages}, counted {self.zpages}")
        return problems


def _fill_pattern(page: PageArg) -> int | None:
    """The 8 bytes repeated over the whole page as a little-endian int (zero pages: 0),
    or None.

    Compared as bytes: ``==`` on a memoryview (the arena, a request payload) compares
    item by item, 13 us a page against 0.6 us for the copy and a memcmp.
    """
    raw = page if type(page) is bytes else bytes(page)
    head = raw[:8]
    return int.from_bytes(head, "little") if head * (PAGE_SIZE // 8) == raw else None
