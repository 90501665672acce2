"""cleancache and frontswap front ends, mapped onto a Zcache as zcache2 did.

These are the two kernel interfaces that fed tmem (mm/cleancache.c and
mm/frontswap.c, 3.10 era) together with zcache's glue for them
(kernel-zcache2.md sections 2.1-2.4). They own the bookkeeping the kernel keeps
*outside* the backend (the per-swap-device bitmap, the debugfs counters), so a
program driving them sees the same contract a filesystem or the swap code saw.

Counters are returned by ``stats()`` with a ``cleancache_`` / ``frontswap_``
prefix so they merge into ``Zcache.stats()`` without clashing.
"""

from __future__ import annotations

from collections.abc import Iterator

from tmem.compress import PAGE_SIZE
from tmem.errors import InvalidHandleError, PageSizeError, PoolLimitError, UnknownPoolError
from tmem.zcache import Oid, Zcache

_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1

#: cleancache keys: an inode number, or an exportfs file handle of up to 6 u32.
FILEHANDLE_MAX = 24

#: frontswap key swizzle: each swap type is spread over 2**SWIZ_BITS objects.
SWIZ_BITS = 8
_SWIZ_MASK = (1 << SWIZ_BITS) - 1
#: swap types must leave room for the swizzled offset bits in oid word 0.
MAX_SWAP_TYPE = (1 << (64 - SWIZ_BITS)) - 1

CleancacheKey = int | bytes


def filekey_to_oid(key: CleancacheKey) -> Oid:
    """Map a cleancache key to a 192-bit oid, as zcache reinterprets the key union.

    An inode number lands in word 0 (the ``ino`` member of the kernel union on a
    little-endian machine); a file handle of up to 24 bytes is zero-padded and read
    as three little-endian u64 words.
    """
    if isinstance(key, bool):
        raise InvalidHandleError(f"cleancache key must be an int or bytes, not {key!r}")
    if isinstance(key, int):
        if not 0 <= key <= _U64:
            raise InvalidHandleError(f"inode number out of range (u64): {key}")
        return (key, 0, 0)
    if isinstance(key, bytes | bytearray | memoryview):
        fh = bytes(key)
        if len(fh) > FILEHANDLE_MAX:
            raise InvalidHandleError(
                f"file handle too long: {len(fh)} bytes (max {FILEHANDLE_MAX})"
            )
        fh = fh.ljust(FILEHANDLE_MAX, b"\0")
        return (
            int.from_bytes(fh[0:8], "little"),
            int.from_bytes(fh[8:16], "little"),
            int.from_bytes(fh[16:24], "little"),
        )
    raise InvalidHandleError(f"cleancache key must be an int or bytes, not {type(key).__name__}")


class Cleancache:
    """The cleancache backend ops on top of a Zcache (ephemeral pools).

    Semantics follow zcache: puts may silently not stick, gets are exclusive
    (a hit removes the page), and a put never leaves a stale older copy behind.
    Page indexes that do not fit in 32 bits are skipped, as the kernel did: a put
    is dropped and a get misses.

    ``init_fs`` with a page size other than 4096 raises :class:`PageSizeError`
    (bad input); running out of pool slots returns -1, the kernel's "no
    cleancache for this filesystem", so a caller can keep going uncached.

    Shared pools (``init_shared_fs``) are keyed by their 16-byte uuid: the same
    uuid yields the same pool id, and the pool is destroyed only when the last
    filesystem that named it calls ``invalidate_fs``.
    """

    def __init__(self, zc: Zcache) -> None:
        self.zc = zc
        self.succ_gets = 0
        self.failed_gets = 0
        self.puts = 0
        self.invalidates = 0
        self._shared_by_uuid: dict[bytes, int] = {}
        self._shared_refs: dict[int, int] = {}
        self._pools: set[int] = set()

    @staticmethod
    def _check_pagesize(pagesize: int) -> None:
        if pagesize != PAGE_SIZE:
            raise PageSizeError(f"cleancache page size must be {PAGE_SIZE}, got {pagesize}")

    def init_fs(self, pagesize: int = PAGE_SIZE) -> int:
        """Create a private ephemeral pool for a newly mounted fs; -1 if none is free."""
        self._check_pagesize(pagesize)
        try:
            pool = self.zc.new_pool(persistent=False)
        except PoolLimitError:
            return -1
        self._pools.add(pool)
        return pool

    def init_shared_fs(self, uuid: bytes, pagesize: int = PAGE_SIZE) -> int:
        """Return the ephemeral pool shared by every fs mounted with ``uuid``; -1 if none."""
        if not isinstance(uuid, bytes | bytearray) or len(uuid) != 16:
            raise InvalidHandleError("shared cleancache pools need a 16-byte uuid")
        self._check_pagesize(pagesize)
        key = bytes(uuid)
        pool = self._shared_by_uuid.get(key)
        if pool is None:
            try:
                pool = self.zc.new_pool(persistent=False, shared=True, uuid=key)
            except PoolLimitError:
                return -1
            self._shared_by_uuid[key] = pool
            self._pools.add(pool)
        self._shared_refs[pool] = self._shared_refs.get(pool, 0) + 1
        return pool

    def put_page(self, pool: int, key: CleancacheKey, index: int, page: bytes) -> None:
        """Offer a clean page; it may or may not be kept (result deliberately ignored)."""
        if pool < 0:
            return  # the fs has no pool: cleancache is off for it
        oid = filekey_to_oid(key)
        self.puts += 1
        if not 0 <= index <= _U32:
            return
        self.zc.put(pool, oid, index, page)

    def get_page(self, pool: int, key: CleancacheKey, index: int) -> bytes | None:
        """Return the page and remove it from the cache (exclusive get), or None."""
        if pool < 0:
            return None
        oid = filekey_to_oid(key)
        data = None
        if 0 <= index <= _U32:
            data = self.zc.get(pool, oid, index, free=True)
        if data is None:
            self.failed_gets += 1
        else:
            self.succ_gets += 1
        return data

    def invalidate_page(self, pool: int, key: CleancacheKey, index: int) -> None:
        """Drop one page (truncation); counted in ``invalidates`` as in the kernel."""
        if pool < 0:
            return
        oid = filekey_to_oid(key)
        self.invalidates += 1
        if 0 <= index <= _U32:
            self.zc.flush_page(pool, oid, index)

    def invalidate_inode(self, pool: int, key: CleancacheKey) -> None:
        """Drop every page of a file (whole-file truncate or delete)."""
        if pool < 0:
            return
        self.zc.flush_object(pool, filekey_to_oid(key))

    def invalidate_fs(self, pool: int) -> None:
        """Unmount: destroy the pool (a shared pool once its last user unmounts)."""
        if pool < 0:
            return
        refs = self._shared_refs.get(pool)
        if refs is not None and refs > 1:
            self._shared_refs[pool] = refs - 1
            return
        if pool not in self._pools:
            raise UnknownPoolError(f"cleancache pool {pool} was not created here")
        self.zc.destroy_pool(pool)
        self._pools.discard(pool)
        if refs is not None:
            del self._shared_refs[pool]
            for uuid, p in list(self._shared_by_uuid.items()):
                if p == pool:
                    del self._shared_by_uuid[uuid]

    def stats(self) -> dict[str, int | float]:
        """The kernel's debugfs ``cleancache/`` counters, prefixed for merging."""
        return {
            "cleancache_succ_gets": self.succ_gets,
            "cleancache_failed_gets": self.failed_gets,
            "cleancache_puts": self.puts,
            "cleancache_invalidates": self.invalidates,
        }


def swizzle(swap_type: int, offset: int) -> tuple[Oid, int]:
    """(type, offset) -> (oid, index): each type spread over 256 objects."""
    return ((swap_type << SWIZ_BITS) | (offset & _SWIZ_MASK), 0, 0), offset >> SWIZ_BITS


def unswizzle(oid: Oid, index: int) -> tuple[int, int]:
    """(oid, index) -> (type, offset); the inverse of :func:`swizzle` (used by writeback)."""
    word0 = oid[0]
    return word0 >> SWIZ_BITS, (index << SWIZ_BITS) | (word0 & _SWIZ_MASK)


class _Bitmap:
    """One bit per swap slot, in a bytearray grown on demand (1 bit, not ~60 B, per page)."""

    __slots__ = ("bits", "count", "limit")

    def __init__(self, limit: int | None) -> None:
        self.bits = bytearray()
        self.count = 0
        self.limit = limit

    def test(self, offset: int) -> bool:
        byte = offset >> 3
        return byte < len(self.bits) and bool(self.bits[byte] >> (offset & 7) & 1)

    def set(self, offset: int) -> None:
        byte = offset >> 3
        bits = self.bits
        if byte >= len(bits):
            # Grow geometrically so a sequential fill costs amortised O(1).
            bits.extend(bytes(max(byte + 1 - len(bits), len(bits) // 2, 64)))
        bits[byte] |= 1 << (offset & 7)

    def clear(self, offset: int) -> None:
        self.bits[offset >> 3] &= ~(1 << (offset & 7)) & 0xFF

    def offsets(self) -> Iterator[int]:
        """Set offsets in ascending order (skips zero bytes quickly)."""
        bits = self.bits
        byte = 0
        n = len(bits)
        while byte < n:
            if bits[byte] == 0:
                # Jump over runs of empty bytes with C-speed searches.
                nxt = _next_nonzero(bits, byte)
                if nxt < 0:
                    return
                byte = nxt
            value = bits[byte]
            for bit in range(8):
                if value >> bit & 1:
                    yield (byte << 3) | bit
            byte += 1


def _next_nonzero(bits: bytearray, start: int) -> int:
    n = len(bits)
    pos = start
    while pos < n:
        chunk = bits[pos : pos + 4096]
        stripped = chunk.lstrip(b"\0")
        if stripped:
            return pos + len(chunk) - len(stripped)
        pos += 4096
    return -1


class Frontswap:
    """The frontswap frontend + zcache's backend ops on top of a Zcache.

    All swap types share one persistent pool, created on the first ``init``.
    The per-type bitmap says which slots live in tmem, with the 3.10 semantics:
    a store to a set bit is a duplicate; a failed duplicate store clears the bit
    (and the older copy is flushed, so it can never come back stale); a load asks
    the backend only when the bit is set.

    ``exclusive_gets=True`` (the default, as zcache registered it) makes a
    successful load remove the page and clear its bit; ``False`` keeps the page
    and the bit, which is what a block device (the NBD server) needs.
    """

    SWIZ_BITS = SWIZ_BITS

    def __init__(self, zc: Zcache, exclusive_gets: bool = True) -> None:
        self.zc = zc
        self.exclusive_gets = exclusive_gets
        self.pool: int | None = None
        self.loads = 0
        self.succ_stores = 0
        self.failed_stores = 0
        self.invalidates = 0
        self._maps: dict[int, _Bitmap] = {}

    swizzle = staticmethod(swizzle)
    unswizzle = staticmethod(unswizzle)

    def init(self, swap_type: int, nr_pages: int | None = None) -> None:
        """swapon: start (or restart, empty) the bitmap of ``swap_type``.

        ``nr_pages`` is the device size in pages, as swapon knows it: offsets at or
        beyond it are refused, which bounds the bitmap (a server passes its export
        size so no client can make it allocate more). Without it the bitmap grows to
        the highest offset stored (at most 512 MiB, for offset 2**32 - 1).
        """
        if isinstance(swap_type, bool) or not isinstance(swap_type, int):
            raise InvalidHandleError(f"swap type must be an int, not {swap_type!r}")
        if not 0 <= swap_type <= MAX_SWAP_TYPE:
            raise InvalidHandleError(f"swap type out of range: {swap_type}")
        if self.pool is None:
            self.pool = self.zc.new_pool(persistent=True)
        if swap_type in self._maps:
            # A fresh swap device has no frontswap pages: drop leftovers.
            self.invalidate_area(swap_type)
        if nr_pages is not None and (isinstance(nr_pages, bool) or nr_pages < 0):
            raise InvalidHandleError(f"nr_pages must be a non-negative int: {nr_pages!r}")
        self._maps[swap_type] = _Bitmap(nr_pages)

    def _map(self, swap_type: int) -> _Bitmap:
        try:
            return self._maps[swap_type]
        except (KeyError, TypeError):
            raise UnknownPoolError(f"swap type {swap_type!r} was not initialised") from None

    @staticmethod
    def _check_offset(bitmap: _Bitmap, offset: int) -> bool:
        """zcache skips offsets that do not fit in 32 bits; negative ones are errors."""
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidHandleError(f"swap offset must be a non-negative int: {offset!r}")
        if bitmap.limit is not None and offset >= bitmap.limit:
            raise InvalidHandleError(f"swap offset {offset} beyond the device ({bitmap.limit})")
        return offset <= _U32

    def store(self, swap_type: int, offset: int, page: bytes) -> bool:
        """Store a page for a swap slot; False means "write it to the disk instead"."""
        bitmap = self._map(swap_type)
        if len(page) != PAGE_SIZE:
            raise PageSizeError(f"page must be {PAGE_SIZE} bytes, got {len(page)}")
        fits = self._check_offset(bitmap, offset)
        dup = bitmap.test(offset)
        assert self.pool is not None
        ok = False
        if fits:
            oid, index = swizzle(swap_type, offset)
            ok = self.zc.put(self.pool, oid, index, page)
        if ok:
            if not dup:
                bitmap.set(offset)
                bitmap.count += 1
            self.succ_stores += 1
            return True
        self.failed_stores += 1
        if dup:
            # The backend must not keep the older copy; flush it to be sure.
            oid, index = swizzle(swap_type, offset)
            self.zc.flush_page(self.pool, oid, index)
            bitmap.clear(offset)
            bitmap.count -= 1
        return False

    def load(self, swap_type: int, offset: int) -> bytes | None:
        """Return the slot's page if frontswap holds it, else None (read the disk)."""
        bitmap = self._map(swap_type)
        self._check_offset(bitmap, offset)
        if not bitmap.test(offset):
            return None
        assert self.pool is not None
        oid, index = swizzle(swap_type, offset)
        data = self.zc.get(self.pool, oid, index, free=self.exclusive_gets)
        if data is None:
            return None
        self.loads += 1
        if self.exclusive_gets:
            bitmap.clear(offset)
            bitmap.count -= 1
        return data

    def invalidate_page(self, swap_type: int, offset: int) -> None:
        """The swap slot was freed: forget its page."""
        bitmap = self._map(swap_type)
        self._check_offset(bitmap, offset)
        if not bitmap.test(offset):
            return
        assert self.pool is not None
        oid, index = swizzle(swap_type, offset)
        self.zc.flush_page(self.pool, oid, index)
        bitmap.clear(offset)
        bitmap.count -= 1
        self.invalidates += 1

    def invalidate_area(self, swap_type: int) -> None:
        """swapoff: flush all 256 swizzled objects of the type, clear its bitmap."""
        bitmap = self._map(swap_type)
        assert self.pool is not None
        for low in range(_SWIZ_MASK, -1, -1):
            self.zc.flush_object(self.pool, ((swap_type << SWIZ_BITS) | low, 0, 0))
        bitmap.bits = bytearray()
        bitmap.count = 0

    def curr_pages(self) -> int:
        """Pages frontswap currently holds, over all swap types."""
        return sum(b.count for b in self._maps.values())

    def shrink(self, target_pages: int) -> list[tuple[int, int, bytes]]:
        """Partial swapoff: pull pages back until at most ``target_pages`` remain.

        Returns ``(type, offset, page)`` for each page pulled back; the caller now
        owns those pages (the kernel faulted them back in as anonymous memory).
        Types are drained in ascending order, offsets ascending within a type.
        """
        need = self.curr_pages() - max(0, target_pages)
        out: list[tuple[int, int, bytes]] = []
        if need <= 0 or self.pool is None:
            return out
        for swap_type in sorted(self._maps):
            bitmap = self._maps[swap_type]
            # offsets() reads each byte before yielding its bits, so clearing the
            # bit just yielded is safe while iterating.
            for offset in bitmap.offsets():
                if len(out) >= need:
                    return out
                oid, index = swizzle(swap_type, offset)
                data = self.zc.get(self.pool, oid, index, free=True)
                bitmap.clear(offset)
                bitmap.count -= 1
                if data is not None:
                    out.append((swap_type, offset, data))
        return out

    def stats(self) -> dict[str, int | float]:
        """The kernel's debugfs ``frontswap/`` counters plus curr_pages, prefixed."""
        return {
            "frontswap_loads": self.loads,
            "frontswap_succ_stores": self.succ_stores,
            "frontswap_failed_stores": self.failed_stores,
            "frontswap_invalidates": self.invalidates,
            "frontswap_curr_pages": self.curr_pages(),
        }


def merged_stats(zc: Zcache, *frontends: Cleancache | Frontswap) -> dict[str, int | float]:
    """``Zcache.stats()`` plus the prefixed counters of ``frontends`` (for ``/stats``)."""
    out = dict(zc.stats())
    for fe in frontends:
        out.update(fe.stats())
    return out
