"""A block device of ``size`` bytes over a :class:`tmem.Zcache` (the NBD data path).

Tiers, fastest first:

* **RAM** -- a persistent (frontswap) pool: a 4 KiB-aligned write is a store, a read is
  a *non-exclusive* get (a block device may read the same block twice). Zero and
  same-filled pages cost no storage (zcache keeps them as a pampd without a frame).
  With ``compress_behind`` a store lands raw in a free frame of the budget and zcache
  compresses it later (:meth:`tmem.Zcache.compact`, run by the server when idle).
* **huge** -- a page the pool rejects for poor compression is kept raw in a whole
  frame when there is no backing file (``Zcache(huge_pages=True)``, as zram does).
* **backing** -- an optional sparse file, page N at offset N*4096, for poorly
  compressible pages and for LRU persistent pages that zcache writes back when its
  budget is full (:meth:`BlockDevice.write_back` is the zcache writeback target).
  Which pages currently live there is a bitmap, one bit per page.
* **cleancache** -- pages read back from the backing file are kept in an ephemeral
  pool (evicted first by zcache's ouroboros) and invalidated on write. A hit is an
  exclusive get, as in the kernel: the page moves up to the client (whose own page
  cache or swap cache holds it now), so a third read goes to the file again.

Unwritten, trimmed and zeroed blocks read as zeros. Unaligned (e.g. 512-byte) I/O is
read-modify-write of whole pages; each page's RMW runs without yielding, so two
clients writing different sectors of one page never lose an update.

A second bitmap records which pages hold data at all (any tier): NBD block status
(``base:allocation``) reports the rest as holes, so clients skip them when copying.

Pages of a RAMster cluster may live on another node (zcache raises RemotePageError);
the sync methods cannot wait for the network, so the ``a*`` coroutines fetch such
pages through :attr:`BlockDevice.remote_fetch`, store them locally and retry.

The export is volatile like zram: contents live while the process runs.

Keys: page N is ``oid=(N // PAGES_PER_OBJECT, 0, 0), index=N % PAGES_PER_OBJECT`` so
objects stay small (flush_object is cheap) and neighbouring pages share an object.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, TypeVar

from tmem.compress import PAGE_SIZE, Buffer
from tmem.errors import ConfigError, RemotePageError, TmemError
from tmem.zcache import Oid, PutResult, Zcache

log = logging.getLogger(__name__)

PAGES_PER_OBJECT = 512
OBJ_SHIFT = 9  # log2(PAGES_PER_OBJECT)
OBJ_MASK = PAGES_PER_OBJECT - 1
PAGE_SHIFT = 12
PAGE_MASK = PAGE_SIZE - 1
ZERO_PAGE = bytes(PAGE_SIZE)
# Pages processed between yields to the event loop in the async methods: 1 MiB of
# work (a few ms) keeps other clients responsive during a 32 MiB request.
CHUNK_PAGES = 256
STATUS_PAGES = 32768  # pages per block status reply (128 MiB, a few ms to scan)
# How many times an async request re-fetches remote pages before giving up (a page can
# be remotified again while we wait for another one).
REMOTE_RETRIES = 4

# (pool_id, oid, index, remote pampd) -> the page's 4096 bytes, from another node.
RemoteFetch = Callable[[int, Oid, int, object], Awaitable[bytes]]
T = TypeVar("T")


class BlockDeviceError(TmemError):
    """An I/O request the device refuses; ``errno`` is the NBD error to reply with."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


@dataclass(slots=True)
class BlockDeviceCounters:
    """Per-tier counters (exported by /stats and /metrics)."""

    read_bytes: int = 0
    write_bytes: int = 0
    trim_bytes: int = 0
    zero_bytes: int = 0
    flushes: int = 0
    rmw: int = 0
    ram_stores: int = 0
    backing_stores: int = 0  # pages sent straight to the backing file
    writeback_pages: int = 0  # LRU pages zcache (or we) moved from RAM to the file
    writeback_bytes: int = 0
    backing_reads: int = 0
    cleancache_hits: int = 0
    cleancache_misses: int = 0
    zero_reads: int = 0
    enospc: int = 0
    remote_fetches: int = 0  # pages brought home from a RAMster peer


class _Bitmap:
    """One bit per page: cheap for millions of pages (1 GiB export = 32 KiB)."""

    __slots__ = ("bits", "count")

    def __init__(self, nbits: int) -> None:
        self.bits = bytearray((nbits + 7) // 8)
        self.count = 0

    def __contains__(self, n: int) -> bool:
        return bool(self.bits[n >> 3] & (1 << (n & 7)))

    def add(self, n: int) -> None:
        mask = 1 << (n & 7)
        if not self.bits[n >> 3] & mask:
            self.bits[n >> 3] |= mask
            self.count += 1

    def discard(self, n: int) -> bool:
        mask = 1 << (n & 7)
        if self.bits[n >> 3] & mask:
            self.bits[n >> 3] &= ~mask & 0xFF
            self.count -= 1
            return True
        return False

    def add_range(self, first: int, end: int) -> None:
        """Set bits first..end-1: whole bytes at once in the middle."""
        if end - first == 1:  # a 4 KiB request: skip the bit counting
            self.add(first)
            return
        bits = self.bits
        lo, hi = first >> 3, (end + 7) >> 3
        before = int.from_bytes(bits[lo:hi]).bit_count()
        while first < end and first & 7:
            bits[first >> 3] |= 1 << (first & 7)
            first += 1
        whole = end & ~7
        if first < whole:
            bits[first >> 3 : whole >> 3] = b"\xff" * ((whole - first) >> 3)
            first = whole
        while first < end:
            bits[first >> 3] |= 1 << (first & 7)
            first += 1
        self.count += int.from_bytes(bits[lo:hi]).bit_count() - before


def _key(page_no: int) -> tuple[Oid, int]:
    return (page_no >> OBJ_SHIFT, 0, 0), page_no & OBJ_MASK


class BlockDevice:
    """``size`` bytes of volatile block storage over one zcache (see module doc).

    Not thread-safe: one asyncio loop drives it. Sync methods do bounded work per
    page; the ``a*`` coroutines split big requests into chunks and yield between
    them so one 32 MiB write does not stall other connections.

    ``memory``, ``compressor``, ``compress_behind``, ``allocator``, ``prefault``,
    ``recompress`` and ``recompress_after`` describe the :class:`~tmem.Zcache` the device
    builds; a caller that passes its own ``zcache`` has already chosen them.
    """

    def __init__(
        self,
        size: int,
        *,
        memory: int | str = "64MiB",
        compressor: str = "lz4",
        backing: str | os.PathLike[str] | None = None,
        zcache: Zcache | None = None,
        compress_behind: bool = False,
        allocator: str = "zsmalloc",
        prefault: bool = False,
        recompress: str | None = None,
        recompress_after: float = 30.0,
    ) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ConfigError(f"export size must be a positive multiple of 4096, got {size}")
        self.size = size
        self.npages = size // PAGE_SIZE
        self.counters = BlockDeviceCounters()
        self.backing_path = os.fspath(backing) if backing is not None else None
        self._fd: int | None = None
        self._closed = False
        self._backing_is_file = False
        if self.backing_path is not None:
            self._fd = self._open_backing(self.backing_path, size)
        self._in_backing = _Bitmap(self.npages)
        # Pages holding data (in any tier), for NBD block status: clear bits are holes.
        self._written = _Bitmap(self.npages)
        # Without a backing file, incompressible pages are kept raw (zram's huge pages).
        self.zcache = zcache or Zcache(
            memory,
            compressor,
            huge_pages=self._fd is None,
            writeback=self if self._fd is not None else None,
            compress_behind=compress_behind,
            allocator=allocator,
            prefault=prefault,
            recompress=recompress,
            recompress_after=recompress_after,
        )
        if zcache is not None and self._fd is not None and zcache.writeback is None:
            zcache.writeback = self
        # Set by a cluster layer: fetches a page that zcache says lives on another node.
        self.remote_fetch: RemoteFetch | None = None
        self.pool = self.zcache.new_pool(persistent=True)
        self.cache_pool = self.zcache.new_pool(persistent=False) if self._fd is not None else None

    def _open_backing(self, path: str, size: int) -> int:
        """Open the spill file (or block device) for page N at offset N*4096.

        A regular file is emptied and made sparse at the export size: its old contents
        belong to a previous (volatile) run, and it can never grow past the export size.
        A block device must be at least the export size.
        """
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot use backing file {path}: {exc}") from exc
        try:
            if stat.S_ISBLK(os.fstat(fd).st_mode):
                have = os.lseek(fd, 0, os.SEEK_END)
                if have < size:
                    raise ConfigError(f"backing device {path} has {have} bytes, need {size}")
            else:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
                self._backing_is_file = True
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"cannot use backing file {path}: {exc}") from exc
        except ConfigError:
            os.close(fd)
            raise
        return fd

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Drop the pools and empty the backing file (the contents are volatile)."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(TmemError):
                self.zcache.destroy_pool(self.pool)
                if self.cache_pool is not None:
                    self.zcache.destroy_pool(self.cache_pool)
        if self._fd is not None:
            if self._backing_is_file:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, 0)  # give the disk space back
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> BlockDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------- zcache target
    def write_back(self, pool_id: int, oid: Oid, index: int, page: bytes) -> bool:
        """Zcache writeback target: move one LRU persistent page into the backing file.

        Called synchronously from zcache's put path when RAM and ephemeral frames are
        exhausted; True lets zcache drop its copy.
        """
        if self._fd is None or pool_id != self.pool:
            return False
        page_no = oid[0] * PAGES_PER_OBJECT + index
        if not 0 <= page_no < self.npages or len(page) != PAGE_SIZE:
            return False
        try:
            os.pwrite(self._fd, page, page_no * PAGE_SIZE)
        except OSError as exc:
            log.warning("writeback of page %d failed: %s", page_no, exc)
            return False
        self._in_backing.add(page_no)
        self.counters.writeback_pages += 1
        self.counters.writeback_bytes += PAGE_SIZE
        return True

    # ---------------------------------------------------------------- page level
    def _read_page(self, n: int) -> bytes:
        # A read_run of one page, not a get: a hole is no failed get (see read_run).
        buf, missing = self._read_pages(n, n + 1)
        return self._read_cold(n) if missing else bytes(buf)

    def _read_cold(self, n: int) -> bytes:
        """A page that is not in the persistent pool: the backing file or zeros."""
        if n in self._in_backing:
            assert self._fd is not None and self.cache_pool is not None
            oid, index = _key(n)
            cached = self.zcache.get(self.cache_pool, oid, index, free=False)
            if cached is not None:
                self.counters.cleancache_hits += 1
                return cached
            self.counters.cleancache_misses += 1
            self.counters.backing_reads += 1
            try:
                data = os.pread(self._fd, PAGE_SIZE, n * PAGE_SIZE)
            except OSError as exc:
                raise BlockDeviceError(errno.EIO, f"backing file read failed: {exc}") from exc
            if len(data) != PAGE_SIZE:  # file truncated behind our back
                raise BlockDeviceError(errno.EIO, f"short read of page {n} from backing file")
            self.zcache.put_status(self.cache_pool, oid, index, data)
            return data
        self.counters.zero_reads += 1
        return ZERO_PAGE

    def _write_page(self, n: int, page: bytes) -> None:
        self._written.add(n)
        result = self.zcache.put_status(self.pool, (n >> OBJ_SHIFT, 0, 0), n & OBJ_MASK, page)
        if result is PutResult.STORED:
            self.counters.ram_stores += 1
            if self._fd is not None and n in self._in_backing:
                self._forget_backing(n)
        else:
            self._store_refused(n, page, result)

    def _forget_backing(self, n: int) -> None:
        """The file's copy of page n is stale: clear its bit and its cleancache copy."""
        assert self.cache_pool is not None
        self._in_backing.discard(n)
        oid, index = _key(n)
        self.zcache.flush_page(self.cache_pool, oid, index)

    def _store_refused(self, n: int, page: bytes, result: PutResult) -> None:
        """The pool did not take page n (and flushed any older copy under its handle)."""
        # NO_MEMORY with a backing file means zcache's own writeback could not free a
        # frame (nothing persistent left to write back): the page itself spills.
        if self._fd is not None:
            if n in self._in_backing:
                self._forget_backing(n)
            try:
                os.pwrite(self._fd, page, n * PAGE_SIZE)
            except OSError as exc:
                self.counters.enospc += 1
                self._written.discard(n)  # old copy is gone too
                err = errno.ENOSPC if exc.errno in (errno.ENOSPC, errno.EDQUOT) else errno.EIO
                raise BlockDeviceError(err, f"backing file write failed: {exc}") from exc
            self._in_backing.add(n)
            self.counters.backing_stores += 1
            return
        self.counters.enospc += 1
        self._written.discard(n)  # old copy is gone too
        raise BlockDeviceError(errno.ENOSPC, "out of memory and no backing file")

    def _discard_page(self, n: int) -> None:
        self._written.discard(n)
        oid, index = _key(n)
        self.zcache.flush_page(self.pool, oid, index)
        if self._fd is not None and n in self._in_backing:
            self._forget_backing(n)

    # -------------------------------------------------------------- byte ranges
    def _check(self, offset: int, length: int, err: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BlockDeviceError(err, f"range {offset}+{length} outside export of {self.size}")

    def _pages(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """Yield (page number, start within page, end within page) covering the range."""
        end = offset + length
        n = offset // PAGE_SIZE
        while offset < end:
            start = offset - n * PAGE_SIZE
            stop = min(PAGE_SIZE, end - n * PAGE_SIZE)
            yield n, start, stop
            offset += stop - start
            n += 1

    def _read_range(self, offset: int, length: int) -> bytes:
        if not (offset | length) & PAGE_MASK:
            # Fast path (whole pages): the RAM tier in one buffer, cold tiers patched in.
            first = offset >> PAGE_SHIFT
            buf, missing = self._read_pages(first, (offset + length) >> PAGE_SHIFT)
            for m in missing:
                page = self._read_cold(first + m)
                if page is not ZERO_PAGE:
                    buf[m << PAGE_SHIFT : (m + 1) << PAGE_SHIFT] = page
            return bytes(buf)
        parts = []
        for n, start, stop in self._pages(offset, length):
            page = self._read_page(n)
            parts.append(page if stop - start == PAGE_SIZE else page[start:stop])
        return b"".join(parts)

    def _read_pages(self, first: int, end: int) -> tuple[bytearray, list[int]]:
        """RAM-tier pages first..end-1 as one buffer, and the positions (from ``first``)
        the pool has no page for (zeros in the buffer): a zcache read_run per object,
        which decompresses the run in one call."""
        read_run, pool = self.zcache.read_run, self.pool
        stop = min(end, (first | OBJ_MASK) + 1)
        buf, missing = read_run(pool, (first >> OBJ_SHIFT, 0, 0), first & OBJ_MASK, stop - first)
        while stop < end:  # the range crosses objects (2 MiB): rare, costs a copy
            n, stop = stop, min(end, stop + PAGES_PER_OBJECT)
            more, gaps = read_run(pool, (n >> OBJ_SHIFT, 0, 0), 0, stop - n)
            missing += [g + n - first for g in gaps]
            buf += more
        return buf, missing

    def _read_extents(self, offset: int, length: int) -> list[bytes | int]:
        """Like _read_range, but as data runs and hole lengths.

        Pages that were never written or were trimmed come back as an int (that many
        bytes of zeros, merged): the NBD layer sends them as holes under structured
        replies. Consecutive data pages are joined into one run, because one chunk per
        page would cost the client a header and a recv per page.
        """
        out: list[bytes | int] = []
        for r in self._read_runs(offset, length):
            if isinstance(r, int):
                out.append(r)
            else:
                first = r[0]
                out.append(first if len(r) == 1 and type(first) is bytes else b"".join(r))
        return out

    def _read_runs(self, offset: int, length: int) -> list[list[Buffer] | int]:
        """_read_extents with each data run as a list of buffers (views of one read_run
        buffer, not joined: the NBD reply sends them with one writev, no copy)."""
        if (offset | length) & PAGE_MASK:
            return [[self._read_range(offset, length)]] if length else []
        first = offset >> PAGE_SHIFT
        count = length >> PAGE_SHIFT
        buf, missing = self._read_pages(first, first + count)
        if not missing:
            return [[buf]] if count else []
        view, in_backing = memoryview(buf), self._in_backing
        out: list[list[Buffer] | int] = []
        run: list[Buffer] = []
        hole = 0
        done = 0  # pages before this position are in out/run/hole already
        for m in [*missing, count]:
            if m > done:  # RAM pages done..m-1: one view
                if hole:
                    out.append(hole)
                    hole = 0
                run.append(view[done << PAGE_SHIFT : m << PAGE_SHIFT])
            if m == count:
                break
            n = first + m
            if in_backing.count and n in in_backing:
                if hole:
                    out.append(hole)
                    hole = 0
                run.append(self._read_cold(n))
            else:
                if run:
                    out.append(run)
                    run = []
                hole += PAGE_SIZE
                self.counters.zero_reads += 1
            done = m + 1
        if run:
            out.append(run)
        elif hole:
            out.append(hole)
        return out

    def _write_range(self, offset: int, data: bytes) -> None:
        if not (offset | len(data)) & PAGE_MASK:
            # Fast path (whole pages): one zcache put_run per object, over views of the
            # payload (no copy); a refused page takes the slow path and the run goes on.
            first = offset >> PAGE_SHIFT
            end = first + (len(data) >> PAGE_SHIFT)
            self._written.add_range(first, end)
            in_backing = self._in_backing
            if in_backing.count:
                # Older copies in the file are stale from now on. Cleared before storing:
                # zcache's writeback may file pages of this very run while it runs.
                for n in range(first, end):
                    if n in in_backing:
                        self._forget_backing(n)
            put_run, pool, view = self.zcache.put_run, self.pool, memoryview(data)
            n = first
            while n < end:
                stop = min(end, (n | OBJ_MASK) + 1)  # the end of page n's object
                pos = (n - first) << PAGE_SHIFT
                done = put_run(pool, (n >> OBJ_SHIFT, 0, 0), n & OBJ_MASK,
                               view[pos : pos + ((stop - n) << PAGE_SHIFT)])  # fmt: skip
                self.counters.ram_stores += done
                n += done
                if n < stop:  # page n was refused
                    pos = (n - first) << PAGE_SHIFT
                    page = bytes(view[pos : pos + PAGE_SIZE])
                    self._store_refused(n, page, self.zcache.last_refusal)
                    n += 1
            return
        pos = 0
        for n, start, stop in self._pages(offset, len(data)):
            chunk = data[pos : pos + stop - start]
            pos += stop - start
            if stop - start == PAGE_SIZE:
                self._write_page(n, chunk)
            else:
                old = self._read_page(n)  # may raise RemotePageError: redone, counted once
                self.counters.rmw += 1
                self._write_page(n, old[:start] + chunk + old[stop:])

    def _zero_range(self, offset: int, length: int, *, trim: bool) -> None:
        for n, start, stop in self._pages(offset, length):
            if stop - start == PAGE_SIZE:
                self._discard_page(n)
            elif not trim:  # TRIM is a hint: partial pages keep their data
                old = self._read_page(n)
                self.counters.rmw += 1
                self._write_page(n, old[:start] + bytes(stop - start) + old[stop:])

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """NBD ``base:allocation`` extents from ``offset``: (length, flags), where flags
        3 (HOLE | ZERO) marks pages never written or trimmed and 0 marks data.

        Scans at most STATUS_PAGES pages (a bounded pause); the client asks again for
        the rest, as the protocol allows a reply shorter than the request.
        """
        self._check(offset, length, errno.EINVAL)
        if length == 0:
            return []
        written = self._written.bits  # read bit by bit below: no call per page
        first = offset >> PAGE_SHIFT
        end = min((offset + length - 1 >> PAGE_SHIFT) + 1, first + STATUS_PAGES)
        out: list[tuple[int, int]] = []
        state = -1
        run = 0
        for n in range(first, end):
            st = 0 if written[n >> 3] & (1 << (n & 7)) else 3
            if st != state:
                if run:
                    out.append((run, state))
                state, run = st, 0
            run += PAGE_SIZE
        out.append((run, state))
        head = offset & PAGE_MASK  # the first extent starts at offset, not at its page
        out[0] = (out[0][0] - head, out[0][1])
        return out

    # ----------------------------------------------------------- sync interface
    # The sync calls count bytes once they have served them: one that raises
    # RemotePageError has not, and the server redoes it with the a* coroutine, which
    # counts them (so they count once).
    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes at ``offset``; unwritten blocks read as zeros."""
        self._check(offset, length, errno.EINVAL)
        data = self._read_range(offset, length)
        self.counters.read_bytes += length
        return data

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``offset`` (ENOSPC only when RAM and backing are full)."""
        buf = data if isinstance(data, bytes) else bytes(memoryview(data).cast("B"))
        self._check(offset, len(buf), errno.ENOSPC)
        self._write_range(offset, buf)
        self.counters.write_bytes += len(buf)

    def trim(self, offset: int, length: int) -> None:
        """Drop whole pages in the range (a hint: partial pages are left alone)."""
        self._check(offset, length, errno.EINVAL)
        self.counters.trim_bytes += length
        self._zero_range(offset, length, trim=True)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeros; whole pages are dropped (cost nothing)."""
        self._check(offset, length, errno.ENOSPC)
        self._zero_range(offset, length, trim=False)
        self.counters.zero_bytes += length

    def flush(self) -> None:
        """Make completed writes durable in the backing file (NBD FLUSH / FUA)."""
        self.counters.flushes += 1
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise BlockDeviceError(errno.EIO, f"fsync of backing file failed: {exc}") from exc

    # ---------------------------------------------------------- async interface
    # The sync range functions raise RemotePageError when a page lives on another node
    # (RAMster); the coroutines then bring those pages home and run the chunk again.
    async def _with_remote(self, offset: int, length: int, op: Callable[[], T]) -> T:
        for _ in range(REMOTE_RETRIES):
            try:
                return op()
            except RemotePageError:
                await self._repatriate(offset, length)
        raise BlockDeviceError(errno.EIO, "remote pages kept moving; giving up")

    async def _repatriate(self, offset: int, length: int) -> None:
        """Fetch every remote page of the range and store it locally (RAMster repatriation).

        Storing replaces the remote pampd, so zcache tells the cluster layer to free the
        remote copy (``remote_hooks.on_free``).
        """
        if self.remote_fetch is None:
            raise BlockDeviceError(errno.EIO, "page is on a remote node and no cluster is attached")
        for n in range(offset >> PAGE_SHIFT, (offset + max(length, 1) - 1 >> PAGE_SHIFT) + 1):
            oid, index = _key(n)
            pampd = self.zcache.lookup(self.pool, oid, index)
            if pampd is None or type(pampd) is int:
                continue
            try:
                page = await self.remote_fetch(self.pool, oid, index, pampd)
            except Exception as exc:
                raise BlockDeviceError(
                    errno.EIO, f"remote fetch of page {n} failed: {exc}"
                ) from exc
            if len(page) != PAGE_SIZE:
                raise BlockDeviceError(errno.EIO, f"remote node sent {len(page)} bytes for a page")
            self.counters.remote_fetches += 1
            if self.zcache.lookup(self.pool, oid, index) is pampd:  # not rewritten meanwhile
                self._write_page(n, page)

    async def aread(self, offset: int, length: int) -> bytes:
        """:meth:`read` in chunks, yielding to the loop between them."""
        self._check(offset, length, errno.EINVAL)
        self.counters.read_bytes += length
        parts = []
        for pos, size in self._chunks(offset, length):
            parts.append(await self._with_remote(pos, size, partial(self._read_range, pos, size)))
            if size == CHUNK_PAGES * PAGE_SIZE:
                await asyncio.sleep(0)
        return parts[0] if len(parts) == 1 else b"".join(parts)  # [] -> b""

    def read_extents(self, offset: int, length: int) -> list[bytes | int]:
        """:meth:`read` as pages and hole lengths (ints), for zero-copy NBD replies."""
        self._check(offset, length, errno.EINVAL)
        extents = self._read_extents(offset, length)
        self.counters.read_bytes += length
        return extents

    async def aread_extents(self, offset: int, length: int) -> list[bytes | int]:
        """:meth:`read_extents` in chunks, yielding to the loop between them."""
        self._check(offset, length, errno.EINVAL)
        self.counters.read_bytes += length
        out: list[bytes | int] = []
        for pos, size in self._chunks(offset, length):
            part = await self._with_remote(pos, size, partial(self._read_extents, pos, size))
            last, first = (out[-1] if out else None), (part[0] if part else None)
            if isinstance(last, int) and isinstance(first, int):  # merge adjacent holes
                out[-1] = last + first
                part = part[1:]
            out.extend(part)
            if size == CHUNK_PAGES * PAGE_SIZE:
                await asyncio.sleep(0)
        return out

    def read_runs(self, offset: int, length: int) -> list[list[Buffer] | int]:
        """:meth:`read_extents` with data runs as lists of buffers (nothing joined)."""
        self._check(offset, length, errno.EINVAL)
        runs = self._read_runs(offset, length)
        self.counters.read_bytes += length
        return runs

    async def awrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """:meth:`write` in chunks, yielding to the loop between them."""
        buf = data if isinstance(data, bytes) else bytes(memoryview(data).cast("B"))
        self._check(offset, len(buf), errno.ENOSPC)
        self.counters.write_bytes += len(buf)
        for pos, size in self._chunks(offset, len(buf)):
            chunk = buf[pos - offset : pos - offset + size] if size != len(buf) else buf
            await self._with_remote(pos, size, partial(self._write_range, pos, chunk))
            if size == CHUNK_PAGES * PAGE_SIZE:
                await asyncio.sleep(0)

    async def atrim(self, offset: int, length: int) -> None:
        self._check(offset, length, errno.EINVAL)
        self.counters.trim_bytes += length
        for pos, size in self._chunks(offset, length, scale=16):
            self._zero_range(pos, size, trim=True)
            await asyncio.sleep(0)

    async def awrite_zeroes(self, offset: int, length: int) -> None:
        self._check(offset, length, errno.ENOSPC)
        self.counters.zero_bytes += length
        for pos, size in self._chunks(offset, length, scale=16):
            await self._with_remote(pos, size, partial(self._zero_range, pos, size, trim=False))
            await asyncio.sleep(0)

    async def aflush(self) -> None:
        """fsync in a worker thread: it can take long and must not stall the loop."""
        self.counters.flushes += 1
        if self._fd is not None:
            fd = self._fd
            try:
                await asyncio.to_thread(os.fsync, fd)
            except OSError as exc:
                raise BlockDeviceError(errno.EIO, f"fsync of backing file failed: {exc}") from exc

    @staticmethod
    def _chunks(offset: int, length: int, scale: int = 1) -> Iterator[tuple[int, int]]:
        """Split a range at page-aligned chunk boundaries (aligned chunks need no RMW)."""
        step = CHUNK_PAGES * PAGE_SIZE * scale
        end = offset + length
        pos = offset
        while pos < end:
            nxt = min(end, (pos // step + 1) * step)
            yield pos, nxt - pos
            pos = nxt

    # -------------------------------------------------------------------- stats
    def stats(self, zcache_stats: Mapping[str, int | float] | None = None) -> dict[str, Any]:
        """Counters of every tier, for /stats and /metrics; ``zcache_stats``: the
        zcache's stats if the caller has them already (they cost a walk of every page)."""
        out: dict[str, Any] = {f"blockdev_{k}": v for k, v in asdict(self.counters).items()}
        out["blockdev_size_bytes"] = self.size
        out["blockdev_backing_pages"] = self._in_backing.count
        # Current pages per tier (zcache is dedicated to this device, so its persistent
        # counts are ours; the ephemeral pool is the cleancache of backing-file pages).
        zs = self.zcache.stats() if zcache_stats is None else zcache_stats
        out["blockdev_ram_pages"] = int(zs.get("pers_zpages", 0))
        out["blockdev_huge_pages"] = int(zs.get("huge_pages", 0))
        out["blockdev_staged_pages"] = int(zs.get("staged_pages", 0))  # raw, compressed later
        out["blockdev_cleancache_pages"] = int(zs.get("eph_zpages", 0))
        return out
