"""zcache: compression, the RAM budget and reclaim, behind the tmem API.

zcache is the backend (the "PAM") for the tmem core (:mod:`tmem.tmem_core`) and the
owner of every pageframe: one preallocated arena of ``memory // 4096`` frames that
is never exceeded. zbud (:mod:`tmem.zbud`) packs compressed pages into the frames zcache
hands it. The put path (kernel-zcache2.md section 4.3, with the RFC's fixes):

1. compress; a same-filled page (all bytes one 8-byte pattern, e.g. zero) gets a pampd
   with no storage; a page over the class threshold is rejected (ephemeral > 4000 B,
   persistent > 3584 B, or > 2560 B while the persistent mean is > 2560 B), or with
   ``huge_pages=True`` a persistent one is kept raw in a whole frame;
2. place into a partial frame with room (never fail while one fits), else a free frame,
   else **ouroboros**: evict the LRU ephemeral frame (flushing its tmem entries) and
   reuse it, so persistent data outranks cache data; else, for a persistent put with a
   ``writeback`` target, zombify the LRU persistent frame, write its pages back and reuse
   it; else the put fails;
3. map the handle to the new pampd; an older copy under the handle is freed. A put that
   fails also flushes any older copy: a stale page must never be returned.

The hot paths (:meth:`Zcache.put_status`, :meth:`Zcache.get`) are written flat on
purpose: puts per second is a feature, and every Python call costs.
"""

from __future__ import annotations

import ctypes
import enum
import mmap
import sys
from array import array
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Protocol

from tmem.compress import PAGE_SIZE, Compressor, find_fills, get_compressor
from tmem.errors import (
    ConfigError,
    InvalidHandleError,
    PageSizeError,
    RemotePageError,
    TmemError,
    UnknownPoolError,
)
from tmem.sizes import parse_size
from tmem.tmem_core import (
    LOCAL_CLIENT,
    U32_MAX,
    Oid,
    Pampd,
    Pool,
    Tmem,
    check_index,
    check_oid,
)
from tmem.zbud import (
    EPH,
    F_HUGE,
    F_STAGED,
    MAX_BUDDY_SIZE,
    PERS,
    Zbud,
)

__all__ = [
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

EPH_MAX_ZSIZE: Final = MAX_BUDDY_SIZE  # 4000
PERS_MAX_ZSIZE: Final = PAGE_SIZE * 7 // 8  # 3584
PERS_MAX_MEAN_ZSIZE: Final = PAGE_SIZE * 5 // 8  # 2560
SAME_FILLED_PROBE: Final = 64  # only pages compressing to <= this many bytes can be same-filled
_ZERO_PAGE = bytes(PAGE_SIZE)
StagedRun = tuple[Pool, Oid, int, list[int]]  # compress-behind queue entry


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
    until the caller drops it (:meth:`Zcache.replace`, a flush) or gives the frame back
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


class Zcache:
    """A compressed page store with a hard RAM budget.

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
        prefault: bool = True,
        compress_behind: bool = False,
    ) -> None:
        nbytes = parse_size(memory)
        if nbytes < PAGE_SIZE:
            raise ConfigError(f"memory budget must be at least one page (4096 B), got {nbytes}")
        self.compressor: Compressor = get_compressor(compressor)
        self._compress = self.compressor.compress
        self._decompress = self.compressor.decompress
        self._gather = self.compressor.gather
        self.frames_total = nbytes // PAGE_SIZE
        self.huge_pages = huge_pages
        # compress-behind: while more than stage_reserve frames are free, a persistent put
        # stores the page raw in a free frame and returns; compact() compresses it later
        # (when the caller is idle, or at once when a put needs the frame back). Staged
        # frames are on no LRU: they are compacted before anything is written back.
        self.compress_behind = compress_behind
        self.stage_reserve = max(16, self.frames_total // 64)
        # Staged runs, oldest first: (pool, oid, first index, frames); stale entries ok.
        self._staged: deque[StagedRun] = deque()
        self._staged_entries = 0  # frames named by _staged (stale ones included)
        self.writeback = writeback
        self.remote_hooks: RemoteHooks | None = None
        # The arena: one anonymous mapping holding the whole budget. Prefaulted by
        # default (the budget is reserved up front, and a first touch of a frame in the
        # put path would cost a page fault); prefault=False commits frames lazily.
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if prefault:
            flags |= getattr(mmap, "MAP_POPULATE", 0)
        self._mm = mmap.mmap(-1, self.frames_total * PAGE_SIZE, flags=flags)
        self.zbud = Zbud(memoryview(self._mm), self.frames_total)  # writes via memoryview
        self.tmem = Tmem(self)
        self._local = self.tmem.local_by_id
        # zcache owns every frame; free ones wait on this stack (frame 0 on top) and zbud
        # takes from it only when zcache hands it over in store().
        self._free_frames = array("i", range(self.frames_total - 1, -1, -1))
        self.counters = ZcacheCounters()  # kernel names where they exist; see stats()
        self.same_filled = [0, 0]  # per class, pages stored as a pattern (no frame)
        self.remote_pages = [0, 0]
        self._why = PutResult.STORED  # why the last failed put failed (see put_status)

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
    def frames_free(self) -> int:
        """Frames not holding data (never used or freed)."""
        return len(self._free_frames)

    @property
    def frames_used(self) -> int:
        return self.frames_total - self.frames_free

    # ---- pamops ----------------------------------------------------------------------

    def free(self, pool: Pool, oid: Oid | None, index: int, pampd: Pampd) -> None:
        """tmem dropped ``pampd``: release its storage (PamOps.free)."""
        if type(pampd) is int:
            if pampd >= 0:
                frame = self.zbud.free(pampd)
                if frame >= 0:
                    self._free_frames.append(frame)
            else:
                self.same_filled[pool.persistent] -= 1
                if pampd == -1:
                    self.counters.zero_filled_pages -= 1
        else:
            self.remote_pages[pool.persistent] -= 1
            if self.remote_hooks is not None:
                self.remote_hooks.on_free(pool.client, pool.pool_id, oid, index, pampd)

    # ---- frames ----------------------------------------------------------------------

    def _take_frame(self, persistent: bool) -> int:
        """A frame for a new zbud when none is free: ouroboros, then writeback; -1 if none."""
        if self._free_frames:
            return self._free_frames.pop()
        if self._staged and self._compact_for_frame():
            return self._free_frames.pop()
        self.counters.failed_getfreepages += 1
        frame = self._evict_eph()
        if frame >= 0:
            if persistent:
                self.counters.pers_ate_eph += 1
            else:
                self.counters.eph_ate_tail += 1
            return frame
        if not persistent:
            self.counters.eph_ate_tail_failed += 1
            return -1
        self.counters.pers_ate_eph_failed += 1
        if self.writeback is not None:
            return self._writeback_one()
        return -1

    def _drop_handle(self, client: int, pool_id: int, oid: Oid, index: int, pampd: int) -> None:
        """Remove the tmem entry for a zbud whose frame was reclaimed (no free)."""
        pool = self.tmem.find_pool(pool_id, client)
        if pool is None:
            return
        pages = pool.objects.get(oid)
        if pages is not None and pages.get(index) == pampd:
            del pages[index]
            if not pages:
                del pool.objects[oid]

    def _evict_eph(self) -> int:
        frame, entries = self.zbud.evict_lru(EPH)
        if frame < 0:
            return -1
        for pampd, (o0, o1, o2, index, pool_id, client) in entries:
            self._drop_handle(client, pool_id, (o0, o1, o2), index, pampd)
        self.counters.evicted_eph_zpages += len(entries)
        self.counters.evicted_eph_pageframes += 1
        return frame

    def evict_ephemeral(self, frames: int = 1) -> int:
        """Evict up to ``frames`` LRU ephemeral frames back to the free pool (a shrinker)."""
        done = 0
        while done < frames:
            frame = self._evict_eph()
            if frame < 0:
                break
            self._free_frames.append(frame)
            done += 1
        return done

    def _writeback_one(self) -> int:
        """Write the LRU persistent frame's pages back; return the emptied frame or -1."""
        assert self.writeback is not None
        zbud = self.zbud
        frame, entries = zbud.zombify_lru(PERS)
        if frame < 0:
            return -1
        emptied = -1
        for pampd, (o0, o1, o2, index, pool_id, client) in entries:
            oid = (o0, o1, o2)
            pool = self.tmem.find_pool(pool_id, client)
            if pool is None or self.tmem.lookup(pool, oid, index) != pampd:
                continue
            if self._write_back(pool, oid, index, self._read(pampd)):
                f = zbud.free(pampd)
                if f >= 0:
                    emptied = f
        if emptied < 0:
            zbud.unzombify(frame)
        return emptied

    def _write_back(self, pool: Pool, oid: Oid, index: int, page: bytes) -> bool:
        """Hand one page to the writeback target and, if it took the page, drop the
        tmem entry (the caller frees the zbud). False if the target refused it."""
        assert self.writeback is not None
        if not self.writeback.write_back(pool.pool_id, oid, index, page):
            self.counters.writeback_failed += 1
            return False
        self.tmem.remove(pool, oid, index)
        self.counters.writtenback_pages += 1
        return True

    def _read(self, pampd: int) -> bytes:
        """The page behind a local pampd, decompressed."""
        if pampd < 0:
            return (-1 - pampd).to_bytes(8, "little") * (PAGE_SIZE // 8)
        start, end = self.zbud.span(pampd)
        if end - start == PAGE_SIZE:  # a huge or staged page: kept raw
            return self._mm[start:end]
        try:
            return self._decompress(self._mm[start:end])
        except Exception as exc:  # a corrupt page must never pass as data
            raise TmemError(f"stored page failed to decompress: {exc}") from exc

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
        objects = pool.objects
        try:
            pages = objects.get(oid)
        except TypeError:
            raise InvalidHandleError(f"oid must be a tuple of three ints, got {oid!r}") from None
        if pages is None:
            check_oid(oid)
        if type(index) is not int or not 0 <= index <= U32_MAX:
            check_index(index)
        persistent = pool.persistent
        if persistent and self.compress_behind and len(self._free_frames) > self.stage_reserve:
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
        if clen <= SAME_FILLED_PROBE:
            pattern = _fill_pattern(page)
            if pattern is not None:
                self._put_same_filled(pool, oid, index, pattern)
                return True
        if clen > PERS_MAX_MEAN_ZSIZE and self._rejects(persistent, clen):
            if persistent and self.huge_pages:
                return self._put_huge(pool, oid, index, bytes(page))
            self._flush_quietly(pool, oid, index)
            self._why = PutResult.POOR_COMPRESSION
            return False
        pampd = self.zbud.store(
            persistent,
            data,
            self._free_frames,
            oid[0],
            oid[1],
            oid[2],
            index,
            pool.pool_id,
            pool.client,
        )
        if pampd < 0:
            frame = self._take_frame(persistent)
            if frame < 0:
                self._no_memory(pool, oid, index)
                return False
            handle = (oid[0], oid[1], oid[2], index, pool.pool_id, pool.client)
            pampd = self.zbud.create(persistent, frame, handle, data)
            pages = objects.get(oid)  # reclaim may have flushed entries of this object
        if pages is None:
            objects[oid] = {index: pampd}
        else:
            old = pages.get(index)
            pages[index] = pampd
            if old is not None:
                self.free(pool, oid, index, old)
        return True

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
        if persistent and self._pers_mean_too_high():
            self.counters.mean_compress_poor += 1
            return True
        return False

    def _pers_mean_too_high(self) -> bool:
        """The mean compressed size of persistent zbuds is over the limit. Raw (huge and
        staged) frames are left out: they take no part in zbud pairing, and counting them
        would reject ever more pages, which would then be stored raw too."""
        c = self.zbud.counters[PERS]
        zpages = c.zpages - c.huge_count + self.same_filled[PERS]
        zbytes = c.zbytes - c.huge_count * PAGE_SIZE
        return zpages > 0 and zbytes > PERS_MAX_MEAN_ZSIZE * zpages

    def _no_memory(self, pool: Pool, oid: OidArg, index: IndexArg) -> None:
        """A put found no frame: count it and drop any older copy under the handle."""
        if pool.persistent:
            self.counters.failed_pers_puts += 1
        else:
            self.counters.failed_eph_puts += 1
        self._flush_quietly(pool, oid, index)
        self._why = PutResult.NO_MEMORY

    def _flush_quietly(self, pool: Pool, oid: OidArg, index: IndexArg) -> None:
        """Drop an older copy after a failed put (coherency: never return stale data)."""
        pages = pool.objects.get(oid)
        if pages is not None and index in pages:
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

    def _put_huge(self, pool: Pool, oid: Oid, index: int, page: bytes) -> bool:
        frame = self._take_frame(True)
        if frame < 0:
            self._no_memory(pool, oid, index)
            return False
        handle = (oid[0], oid[1], oid[2], index, pool.pool_id, pool.client)
        pampd = self.zbud.create_huge(PERS, frame, handle, page)
        self.counters.huge_pages_stored += 1
        self.tmem.put(pool, oid, index, pampd)
        return True

    # ---- compress-behind ---------------------------------------------------------------

    def _stage(self, pool: Pool, oid: Oid, index: int, pages: memoryview, count: int) -> None:
        """Store ``count`` persistent pages raw in free frames, for :meth:`compact` to
        compress; the caller checked the arguments and that enough frames are free.

        Same-filled pages (zero pages above all) are stored as their pattern at once
        when the C helper is there to find them for next to nothing: no frame, no
        copy, nothing to compact later.
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
        frames = self.zbud.stage_run(self._free_frames, pages, count)
        entries = pool.objects.get(oid)
        if entries is None:
            entries = pool.objects[oid] = {}
        i = index
        for frame in frames:
            old = entries.get(i)
            entries[i] = frame << 1
            if old is not None:
                self.free(pool, oid, i, old)
            i += 1
        # One queue entry per run: its pages' handles follow from (pool, oid, index).
        self._staged.append((pool, oid, index, frames))
        self._staged_entries += count
        if self._staged_entries > 4096 and self._staged_entries > 2 * self.staged_pages:
            self._prune_staged()  # rewrites and flushes left stale entries
        self.counters.staged_pages_total += count

    def _is_staged(self, pool: Pool, oid: Oid, index: int, frame: int) -> bool:
        """Does the queue entry (pool, oid, index) -> frame still name a staged page?

        A frame may have been freed (rewrite, flush) and staged again for another page:
        it counts only while the handle maps to it and it is still staged.
        """
        entries = pool.objects.get(oid)
        return (
            entries is not None
            and entries.get(index) == frame << 1
            and bool(self.zbud.flags[frame] & F_STAGED)
        )

    def _prune_staged(self) -> None:
        """Drop stale queue entries (each page once, runs split where pages are gone)."""
        runs: deque[StagedRun] = deque()
        seen: set[int] = set()
        for pool, oid, first, frames in self._staged:
            start = first
            live: list[int] = []
            for k, frame in enumerate(frames):
                if frame not in seen and self._is_staged(pool, oid, first + k, frame):
                    seen.add(frame)
                    if not live:
                        start = first + k
                    live.append(frame)
                elif live:
                    runs.append((pool, oid, start, live))
                    live = []
            if live:
                runs.append((pool, oid, start, live))
        self._staged = runs
        self._staged_entries = len(seen)

    @property
    def staged_pages(self) -> int:
        """Pages stored raw by compress-behind that :meth:`compact` has not reached yet."""
        return self.zbud.counters[PERS].staged_count

    def compact(self, max_pages: int = 64) -> int:
        """Compress up to ``max_pages`` staged pages, oldest first; return how many.

        Each page is compressed and moved into zbud like a normal put (so two of them
        share a frame), or stays raw as a huge page when it compresses poorly (with a
        writeback target and no huge pages, it is written back instead). Call it when
        idle; puts call it themselves when they need a frame.
        """
        done = 0
        staged = self._staged
        while done < max_pages and staged:
            pool, oid, first, frames = staged.popleft()
            take = min(len(frames), max_pages - done)
            for k in range(take):
                if self._is_staged(pool, oid, first + k, frames[k]):
                    self._compact_page(pool, oid, first + k, frames[k])
                    done += 1
            self._staged_entries -= take
            if take < len(frames):
                staged.appendleft((pool, oid, first + take, frames[take:]))
        return done

    def _compact_for_frame(self) -> bool:
        """Compact staged pages until a frame is free (a put needs one); False if none.

        Each staged page is visited once, so this ends; it is long only when many staged
        pages in a row turn out incompressible and stay raw."""
        while not self._free_frames:
            if not self.compact(1):
                return False
        return True

    def _compact_page(self, pool: Pool, oid: Oid, index: int, frame: int) -> None:
        zbud = self.zbud
        handle = (oid[0], oid[1], oid[2], index, pool.pool_id, pool.client)
        pampd = frame << 1
        start = frame * PAGE_SIZE
        page = zbud.arena[start : start + PAGE_SIZE]
        data = self._compress(page)
        clen = len(data)
        self.counters.compacted_pages += 1
        if clen <= SAME_FILLED_PROBE:
            pattern = _fill_pattern(page)
            if pattern is not None:
                self._put_same_filled(pool, oid, index, pattern)  # frees the raw frame
                return
        if clen > PERS_MAX_MEAN_ZSIZE and self._rejects(True, clen):
            if (
                not self.huge_pages
                and self.writeback is not None
                and self._write_back(pool, oid, index, bytes(page))
            ):
                self._free_frames.append(zbud.free(pampd))
                return
            zbud.unstage(frame, handle)  # accepted pages are kept: raw, as a huge page
            self.counters.huge_pages_stored += 1
            return
        new = zbud.store(PERS, data, self._free_frames, *handle)
        if new < 0:  # no room anywhere: the raw frame itself becomes the zbud frame
            zbud.free(pampd)
            new = zbud.create(PERS, frame, handle, data)
        else:
            self._free_frames.append(zbud.free(pampd))
        pool.objects[oid][index] = new

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
            and len(self._free_frames) - n >= self.stage_reserve
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
        objects = pool.objects
        try:
            pages = objects.get(oid)
        except TypeError:
            raise InvalidHandleError(f"oid must be a tuple of three ints, got {oid!r}") from None
        if pages is None:
            check_oid(oid)
            check_index(index)
            self.counters.failed_gets += 1
            return None
        pampd = pages.get(index)
        if pampd is None:
            check_index(index)
            self.counters.failed_gets += 1
            return None
        if type(pampd) is not int:
            raise RemotePageError(pampd)
        data = self._read(pampd)
        if free or not pool.persistent:
            del pages[index]
            if not pages:
                del objects[oid]
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
            pages = pool.objects.get(oid)
        except TypeError:
            raise InvalidHandleError(f"oid must be a tuple of three ints, got {oid!r}") from None
        if pages is None:
            check_oid(oid)
            return bytearray(count * PAGE_SIZE), list(range(count))
        missing: list[int] = []
        gather = self._gather
        if gather is None:  # one decompress per page
            out = bytearray(count * PAGE_SIZE)
            for i in range(count):
                pampd = pages.get(first_index + i)
                if pampd is None:
                    missing.append(i)
                elif type(pampd) is int:
                    out[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = self._read(pampd)
                else:
                    raise RemotePageError(pampd)
            return out, missing
        spans: list[int] = []  # [start, length] per page for gather()
        span = self.zbud.span
        for i in range(count):
            pampd = pages.get(first_index + i)
            if pampd is None:
                missing.append(i)
                spans.append(0)
                spans.append(-1)
            elif type(pampd) is not int:
                raise RemotePageError(pampd)
            elif pampd < 0:  # same-filled: the 8-byte pattern
                spans.append(-1 - pampd)
                spans.append(0)
            else:  # length PAGE_SIZE: a huge or staged page, copied raw
                start, end = span(pampd)
                spans.append(start)
                spans.append(end - start)
        try:
            return gather(self._mm, spans), missing
        except ValueError as exc:  # a corrupt page must never pass as data
            raise TmemError(f"stored page failed to decompress: {exc}") from exc

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

    def zombify_lru(self, persistent: bool) -> list[ZombiePage]:
        """Hand out the pages of the LRU frame of a class for writeback or remotify.

        The frame leaves the LRU and the unbuddied lists, so nothing new lands in it; the
        pages stay readable until replaced (:meth:`replace`) or flushed, and then the
        frame returns to the free pool. :meth:`unzombify` undoes it. [] if none.
        """
        frame, entries = self.zbud.zombify_lru(PERS if persistent else EPH)
        if frame < 0:
            return []
        huge = bool(self.zbud.flags[frame] & F_HUGE)
        out = []
        for pampd, (o0, o1, o2, index, pool_id, client) in entries:
            start, end = self.zbud.span(pampd)
            out.append(
                ZombiePage(
                    client,
                    pool_id,
                    (o0, o1, o2),
                    index,
                    self._mm[start:end],
                    not huge,
                    pampd,
                    persistent,
                )
            )
        return out

    def unzombify(self, page: ZombiePage) -> None:
        """Give a zombie frame back to the LRU (e.g. the peer refused the page)."""
        frame = page.pampd >> 1
        if self.zbud.is_zombie(frame) and (self.zbud.size0[frame] or self.zbud.size1[frame]):
            self.zbud.unzombify(frame)

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
            return current == expected.pampd and self.zbud.is_zombie(expected.pampd >> 1)

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
        if clen > limit:
            self.counters.compress_poor += 1
            self._flush_quietly(pool, oid, index)
            return PutResult.POOR_COMPRESSION
        cls = PERS if pool.persistent else EPH
        handle = (oid[0], oid[1], oid[2], index, pool.pool_id, pool.client)
        data = bytes(data)
        pampd = self.zbud.store(cls, data, self._free_frames, *handle)
        if pampd < 0:
            frame = self._take_frame(pool.persistent)
            if frame < 0:
                self._no_memory(pool, oid, index)
                return PutResult.NO_MEMORY
            pampd = self.zbud.create(cls, frame, handle, data)
        self.tmem.put(pool, oid, index, pampd)
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
        pool = self._pool(pool_id, client)
        pampd = self.tmem.lookup(pool, check_oid(oid), check_index(index))
        if pampd is None:
            return None
        if type(pampd) is not int:
            raise RemotePageError(pampd)
        if pampd < 0:
            out = (self._read(pampd), False)
        else:
            start, end = self.zbud.span(pampd)
            out = (self._mm[start:end], not self.zbud.flags[pampd >> 1] & F_HUGE)
        if free or (free is None and not pool.persistent):
            self.tmem.remove(pool, oid, index)
            self.free(pool, oid, index, pampd)
        return out

    def get_compressed_many(
        self,
        pool_id: PoolIdArg,
        keys: Iterable[tuple[OidArg, IndexArg]],
        free: bool | None = None,
        *,
        client: int = LOCAL_CLIENT,
    ) -> list[tuple[bytes, bool] | None]:
        """Batch :meth:`get_compressed` for one pool: one result per ``(oid, index)``.

        For a RAMster node answering a peer's get batch: the pool and the arena are
        looked up once, and a handle that is found needs no validation (it was
        validated when stored), as in :meth:`get`. Raises like :meth:`get_compressed`
        (bad handle, remote page) at the first such key; pages before it were read
        (and, when freeing, removed).
        """
        pool = self._pool(pool_id, client)
        objects = pool.objects
        remove = bool(free) or (free is None and not pool.persistent)
        mm = self._mm
        span = self.zbud.span
        out: list[tuple[bytes, bool] | None] = []
        for oid, index in keys:
            try:
                pages = objects.get(oid)
            except TypeError:
                raise InvalidHandleError(
                    f"oid must be a tuple of three ints, got {oid!r}"
                ) from None
            if pages is None:
                check_oid(oid)
                check_index(index)
                out.append(None)
                continue
            pampd = pages.get(index)
            if pampd is None:
                check_index(index)
                out.append(None)
                continue
            if type(pampd) is not int:
                raise RemotePageError(pampd)
            if pampd < 0:
                out.append((self._read(pampd), False))
            else:
                start, end = span(pampd)
                out.append((mm[start:end], end - start != PAGE_SIZE))  # raw: a huge page
            if remove:
                self.tmem.remove(pool, oid, index)
                self.free(pool, oid, index, pampd)
        return out

    def decompress(self, data: bytes) -> bytes:
        """Decompress a stored page (e.g. one that came back from a peer)."""
        return self._decompress(data)

    # ---- stats -----------------------------------------------------------------------

    def metadata_bytes(self) -> int:
        """Bytes of bookkeeping outside the arena: zbud columns plus the tmem maps.

        Counts the dicts, tuples and int objects Python allocates for the tmem maps
        (small ints are cached by CPython and cost nothing). Walks every page (about
        35 ms per million pages).
        """
        return self._walk_all().metadata_bytes

    def _walk_all(self) -> _MapTotals:
        totals = _MapTotals()
        for _ in self._walk_maps(totals, 1 << 62):
            pass
        return totals

    def _walk_maps(self, totals: _MapTotals, pages_per_step: int) -> Iterator[None]:
        """Add up the tmem maps' metadata bytes and objects into ``totals``, yielding
        after each ``pages_per_step`` pages or so (between objects)."""
        totals.metadata_bytes = self.zbud.metadata_bytes() + self._free_frames.buffer_info()[1] * 4
        totals.metadata_bytes += sum(120 + 36 * len(run[3]) for run in self._staged)
        getsizeof = sys.getsizeof
        walked = 0
        for pool in self.tmem.pools():
            total = getsizeof(pool.objects) + 200
            totals.obj_count += len(pool.objects)
            for oid, pages in list(pool.objects.items()):  # it may change between steps
                total += getsizeof(pages) + getsizeof(oid)
                total += sum(getsizeof(w) for w in oid if w > 256)
                for index, pampd in pages.items():
                    if index > 256:
                        total += 28
                    if type(pampd) is int:
                        if pampd > 256 or pampd < -5:  # a one-digit int is 28 bytes
                            small = -0x3FFFFFFF <= pampd <= 0x3FFFFFFF
                            total += 28 if small else getsizeof(pampd)
                    else:
                        total += getsizeof(pampd)
                walked += len(pages)
                if walked >= pages_per_step:
                    totals.metadata_bytes += total
                    total = walked = 0
                    yield None
            totals.metadata_bytes += total

    def stats_steps(self, pages_per_step: int = 32768) -> Iterator[dict[str, int | float] | None]:
        """:meth:`stats` in steps: yields None after each ``pages_per_step`` pages of the
        tmem maps walked, then the stats.

        For a server that must not stall its clients while it counts (a /stats scrape
        of millions of pages): let the event loop serve requests at each None. The
        counters are read at the end, all at one instant; only the metadata and object
        totals are summed over the walk (objects created meanwhile are missed).
        """
        totals = _MapTotals()
        yield from self._walk_maps(totals, max(1, pages_per_step))
        yield self._stats(totals)

    def stats(self) -> dict[str, int | float]:
        """Every zcache and zbud counter (kernel debugfs names) plus a zram-style summary."""
        return self._stats(self._walk_all())

    def _stats(self, totals: _MapTotals) -> dict[str, int | float]:
        zb = self.zbud.counters
        zb[EPH].note_max()
        zb[PERS].note_max()
        eph_zpages = zb[EPH].zpages + self.same_filled[EPH]
        pers_zpages = zb[PERS].zpages + self.same_filled[PERS]
        out: dict[str, int | float] = {
            # zcache (section 4.11)
            "obj_count": totals.obj_count,
            "flush_total": self.counters.flush_total,
            "flush_found": self.counters.flush_found,
            "flobj_total": self.counters.flobj_total,
            "flobj_found": self.counters.flobj_found,
            "failed_eph_puts": self.counters.failed_eph_puts,
            "failed_pers_puts": self.counters.failed_pers_puts,
            "failed_getfreepages": self.counters.failed_getfreepages,
            "compress_poor": self.counters.compress_poor,
            "mean_compress_poor": self.counters.mean_compress_poor,
            "eph_ate_tail": self.counters.eph_ate_tail,
            "eph_ate_tail_failed": self.counters.eph_ate_tail_failed,
            "pers_ate_eph": self.counters.pers_ate_eph,
            "pers_ate_eph_failed": self.counters.pers_ate_eph_failed,
            "evicted_eph_zpages": self.counters.evicted_eph_zpages,
            "evicted_eph_pageframes": self.counters.evicted_eph_pageframes,
            "eph_pageframes": zb[EPH].pageframes,
            "eph_pageframes_max": zb[EPH].pageframes_max,
            "pers_pageframes": zb[PERS].pageframes,
            "pers_pageframes_max": zb[PERS].pageframes_max,
            "eph_zpages": eph_zpages,
            "eph_zpages_max": zb[EPH].zpages_max,
            "pers_zpages": pers_zpages,
            "pers_zpages_max": zb[PERS].zpages_max,
            "eph_zbytes": zb[EPH].zbytes,
            "pers_zbytes": zb[PERS].zbytes,
            "zero_filled_pages": self.counters.zero_filled_pages,
            "zero_filled_pages_max": self.counters.zero_filled_pages_max,
            "same_filled_pages": self.same_filled[EPH] + self.same_filled[PERS],
            "huge_pages": zb[EPH].huge_count + zb[PERS].huge_count - zb[PERS].staged_count,
            "huge_pages_stored": self.counters.huge_pages_stored,
            "staged_pages": zb[PERS].staged_count,
            "staged_pages_total": self.counters.staged_pages_total,
            "compacted_pages": self.counters.compacted_pages,
            "same_filled_pages_total": self.counters.same_filled_pages_total,
            "writtenback_pages": self.counters.writtenback_pages,
            "writeback_failed": self.counters.writeback_failed,
            "failed_gets": self.counters.failed_gets,
            "remote_eph_pages": self.remote_pages[EPH],
            "remote_pers_pages": self.remote_pages[PERS],
        }
        for cls, prefix in ((EPH, "zbud_eph_"), (PERS, "zbud_pers_")):
            c = zb[cls]
            out[prefix + "zbytes"] = c.zbytes
            out[prefix + "cumul_zbytes"] = c.cumul_zbytes
            out[prefix + "zpages"] = c.zpages
            out[prefix + "cumul_zpages"] = c.cumul_zpages
            out[prefix + "pageframes"] = c.pageframes
            out[prefix + "evicted_pageframes"] = c.evicted_pageframes
            out[prefix + "buddied_count"] = c.buddied_count
            out[prefix + "unbuddied_count"] = c.unbuddied_count
        out["zbud_pers_zombie_count"] = zb[PERS].zombie_count
        out["zbud_eph_zombie_count"] = zb[EPH].zombie_count
        stored_pages = eph_zpages + pers_zpages
        metadata = totals.metadata_bytes
        # What the process holds for the store: every resident arena page (free frames
        # stay resident once touched; a prefaulted arena is resident whole) + metadata.
        # The compression ratio is over the frames holding data, as before.
        resident = _resident_bytes(self._mm)
        mem_used = resident + metadata
        holding = self.frames_used * PAGE_SIZE + metadata
        out.update(
            {
                "frames_total": self.frames_total,
                "frames_free": self.frames_free,
                "frames_used": self.frames_used,
                "memory_budget": self.frames_total * PAGE_SIZE,
                "stored_pages": stored_pages,
                "orig_data_size": stored_pages * PAGE_SIZE,
                "compr_data_size": zb[EPH].zbytes + zb[PERS].zbytes,
                "metadata_bytes": metadata,
                "arena_resident_bytes": resident,
                "mem_used_total": mem_used,
                "compression_ratio": (stored_pages * PAGE_SIZE / holding) if holding else 0.0,
                "metadata_bytes_per_page": (metadata / stored_pages) if stored_pages else 0.0,
            }
        )
        return out

    # ---- accounting (tests and debugging; never on the put/get paths) ----------------

    def frame_owners(self) -> list[list[str]]:
        """Who holds each frame of the budget: ``"free"`` once for each time the frame is
        on the free stack, plus the allocator's kind if it holds the frame (see
        :meth:`Zbud.frames_held`; ``"staged"`` is a raw compress-behind page).

        Built by walking the free stack and the allocator's frame table, not from the
        counters: exactly one owner per frame is the invariant :meth:`check_frames`
        checks. Entries of the free stack outside the budget are left out here.
        """
        owners: list[list[str]] = [[] for _ in range(self.frames_total)]
        for frame in self._free_frames:
            if 0 <= frame < self.frames_total:
                owners[frame].append("free")
        for frame, kind in self.zbud.frames_held().items():
            owners[frame].append(kind)
        return owners

    def check_frames(self) -> list[str]:
        """Every way the frame accounting is broken, as sentences (none: ``[]``).

        * each frame of the budget has exactly one owner (:meth:`frame_owners`): none is
          a leak, two is a frame both free and in use, or on the free stack twice;
        * the allocator's own structures agree (:meth:`Zbud.check`);
        * every zbud the allocator holds is mapped by exactly one tmem handle, the one
          written in its frame, and every local handle maps to a zbud that is held (an
          unmapped zbud can never be freed; a dangling handle reads another page);
        * every staged frame is named by the compress-behind queue (else it is never
          compacted).

        For tests and debugging: it walks every frame and every stored page.
        """
        total = self.frames_total
        problems = [
            f"free stack entry {frame} is outside the budget of {total} frames"
            for frame in self._free_frames
            if not 0 <= frame < total
        ]
        for frame, owners in enumerate(self.frame_owners()):
            if not owners:
                problems.append(f"frame {frame}: held by nobody (leaked)")
            elif len(owners) > 1:
                problems.append(f"frame {frame}: held {len(owners)} times: {', '.join(owners)}")
        problems.extend("zbud: " + p for p in self.zbud.check())
        mapped: dict[int, tuple[int, int, int, int, int, int]] = {}
        for pool in self.tmem.pools():
            for oid, pages in pool.objects.items():
                for index, pampd in pages.items():
                    if type(pampd) is not int or pampd < 0:
                        continue  # a remote or same-filled page holds no frame
                    handle = (oid[0], oid[1], oid[2], index, pool.pool_id, pool.client)
                    if pampd in mapped:
                        problems.append(f"pampd {pampd}: mapped by {mapped[pampd]} and {handle}")
                    else:
                        mapped[pampd] = handle
        held = self.zbud.frames_held()
        for frame, kind in held.items():
            zbuds: list[tuple[int, tuple[int, ...] | None]] = []
            if kind == "staged":  # zcache keeps staged handles, in its queue
                zbuds.append((frame << 1, None))
            else:
                try:
                    zbuds.extend(self.zbud.handles(frame))
                except KeyError:  # a huge frame without its handle: zbud.check said so
                    zbuds.append((frame << 1, None))
            for pampd, written in zbuds:
                mapper = mapped.pop(pampd, None)
                if mapper is None:
                    problems.append(f"frame {frame} ({kind}): zbud {pampd} mapped by no handle")
                elif written is not None and tuple(written) != mapper:
                    problems.append(f"pampd {pampd}: frame names {written}, tmem maps {mapper}")
        problems.extend(
            f"handle {mapper} maps to zbud {pampd}, which is not held"
            for pampd, mapper in mapped.items()
        )
        queued: set[int] = set()
        for run_pool, run_oid, first, frames in self._staged:
            entries = run_pool.objects.get(run_oid)
            if entries is not None:
                for k, frame in enumerate(frames):
                    if entries.get(first + k) == frame << 1:
                        queued.add(frame)
        problems.extend(
            f"frame {frame}: staged, but not on the compress-behind queue"
            for frame in sorted(held)
            if held[frame] == "staged" and frame not in queued
        )
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


def _find_mincore() -> Any:
    """libc's mincore(2), or None where there is none (then the arena counts whole)."""
    try:
        mincore = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    mincore.restype = ctypes.c_int
    return mincore


_MINCORE: Final = _find_mincore()
_LOW_BIT: Final = bytes(i & 1 for i in range(256))  # mincore's other bits are unspecified


def _resident_bytes(mm: mmap.mmap) -> int:
    """Bytes of the mapping ``mm`` resident in RAM, asked of the kernel (mincore).

    Anonymous pages count from their first write until unmapped (or swapped out);
    where the kernel cannot be asked, the whole mapping is counted (what it may hold).
    """
    size = len(mm)
    if _MINCORE is None or not size:
        return size
    vec = bytearray((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    out = (ctypes.c_ubyte * len(vec)).from_buffer(vec)
    if _MINCORE(addr, size, out) != 0:
        return size
    return vec.translate(_LOW_BIT).count(1) * mmap.PAGESIZE


@dataclass
class _MapTotals:
    """What one walk over the tmem maps adds up (for stats)."""

    metadata_bytes: int = 0
    obj_count: int = 0
