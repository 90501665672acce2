"""zcache: the compressed page store behind the tmem API.

TEMPORARY REFERENCE IMPLEMENTATION (dict based) so that other layers can be built
and tested against the final public API while the zbud-backed engine lands.
The public surface below is the contract; internals will change.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from tmem.compress import PAGE_SIZE, Compressor, get_compressor
from tmem.errors import (
    ConfigError,
    InvalidHandleError,
    PageSizeError,
    PoolLimitError,
    RemotePageError,
    UnknownPoolError,
)
from tmem.sizes import parse_size

Oid = tuple[int, int, int]
LOCAL_CLIENT = 0xFFFF
MAX_POOLS_PER_CLIENT = 16
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1


class PutResult(enum.IntEnum):
    """Why a put did or did not store the page."""

    STORED = 0
    POOR_COMPRESSION = 1  # compressed size over the class threshold (compress_poor)
    NO_MEMORY = 2  # budget full and nothing evictable


@dataclass(frozen=True, slots=True)
class ZombiePage:
    """A page handed out by :meth:`Zcache.zombify_lru` for writeback or remotify.

    ``data`` is the stored form: compressed with the Zcache's compressor, or the
    raw page when ``compressed`` is False (huge pages, same-filled pages).
    The page stays readable in tmem until the caller flushes or replaces it.
    """

    client: int
    pool_id: int
    oid: Oid
    index: int
    data: bytes
    compressed: bool


class WritebackTarget(Protocol):
    """Where LRU persistent pages go when RAM is full (the seed's nice-to-have A)."""

    def write_back(self, pool_id: int, oid: Oid, index: int, page: bytes) -> bool:
        """Store ``page`` durably elsewhere; True means zcache may drop its copy."""
        ...


class RemoteHooks(Protocol):
    """Called when tmem drops a non-local (remote) pampd, so the owner can flush it."""

    def on_free(self, client: int, pool_id: int, oid: Oid | None, index: int, pampd: object) -> None:
        ...


class Zcache:
    """Compressed page store with a hard RAM budget (see module docstring)."""

    page_size = PAGE_SIZE

    def __init__(
        self,
        memory: int | str = "64MiB",
        compressor: str = "lz4",
        *,
        huge_pages: bool = False,
        writeback: WritebackTarget | None = None,
    ) -> None:
        nbytes = parse_size(memory)
        if nbytes < PAGE_SIZE:
            raise ConfigError(f"memory budget must be at least one page, got {nbytes}")
        self.compressor: Compressor = get_compressor(compressor)
        self.frames_total = nbytes // PAGE_SIZE
        self.huge_pages = huge_pages
        self.writeback = writeback
        self.remote_hooks: RemoteHooks | None = None
        self._pools: dict[tuple[int, int], dict[Oid, dict[int, bytes]]] = {}
        self._persistent: dict[tuple[int, int], bool] = {}
        self._used = 0

    @property
    def frames_free(self) -> int:
        return self.frames_total - (self._used + PAGE_SIZE - 1) // PAGE_SIZE

    def new_pool(
        self,
        persistent: bool = False,
        shared: bool = False,
        uuid: bytes | None = None,
        *,
        client: int = LOCAL_CLIENT,
        pool_id: int | None = None,
    ) -> int:
        ids = [pid for (c, pid) in self._pools if c == client]
        if pool_id is None:
            free = [i for i in range(MAX_POOLS_PER_CLIENT) if i not in ids]
            if not free:
                raise PoolLimitError("no free pool slot")
            pool_id = free[0]
        self._pools[(client, pool_id)] = {}
        self._persistent[(client, pool_id)] = persistent
        return pool_id

    def _pool(self, pool_id: int, client: int) -> dict[Oid, dict[int, bytes]]:
        try:
            return self._pools[(client, pool_id)]
        except (KeyError, TypeError):
            raise UnknownPoolError(f"no pool {pool_id!r}") from None

    @staticmethod
    def _check(oid: Oid, index: int) -> None:
        if not (isinstance(oid, tuple) and len(oid) == 3 and all(
            isinstance(w, int) and 0 <= w <= _U64 for w in oid)):
            raise InvalidHandleError(f"bad oid {oid!r}")
        if not (isinstance(index, int) and 0 <= index <= _U32):
            raise InvalidHandleError(f"bad index {index!r}")

    def is_persistent(self, pool_id: int, *, client: int = LOCAL_CLIENT) -> bool:
        self._pool(pool_id, client)
        return self._persistent[(client, pool_id)]

    def put_status(
        self, pool_id: int, oid: Oid, index: int, page: bytes, *, client: int = LOCAL_CLIENT
    ) -> PutResult:
        pool = self._pool(pool_id, client)
        self._check(oid, index)
        if len(page) != PAGE_SIZE:
            raise PageSizeError(f"page must be {PAGE_SIZE} bytes, got {len(page)}")
        self.flush_page(pool_id, oid, index, client=client)
        data = self.compressor.compress(bytes(page))
        if len(data) > 3584:
            return PutResult.POOR_COMPRESSION
        if self._used + len(data) > self.frames_total * PAGE_SIZE:
            return PutResult.NO_MEMORY
        pool.setdefault(oid, {})[index] = data
        self._used += len(data)
        return PutResult.STORED

    def put(self, pool_id: int, oid: Oid, index: int, page: bytes) -> bool:
        return self.put_status(pool_id, oid, index, page) is PutResult.STORED

    def put_many(self, pool_id: int, items: Iterable[tuple[Oid, int, bytes]]) -> list[bool]:
        return [self.put(pool_id, oid, index, page) for oid, index, page in items]

    def get(
        self, pool_id: int, oid: Oid, index: int, free: bool | None = None, *,
        client: int = LOCAL_CLIENT,
    ) -> bytes | None:
        pool = self._pool(pool_id, client)
        self._check(oid, index)
        obj = pool.get(oid)
        if obj is None or index not in obj:
            return None
        if free is None:
            free = not self._persistent[(client, pool_id)]
        data = obj[index]
        if free:
            self.flush_page(pool_id, oid, index, client=client)
        return self.compressor.decompress(data)

    def flush_page(self, pool_id: int, oid: Oid, index: int, *, client: int = LOCAL_CLIENT) -> bool:
        pool = self._pool(pool_id, client)
        self._check(oid, index)
        obj = pool.get(oid)
        if obj is None or index not in obj:
            return False
        self._used -= len(obj.pop(index))
        if not obj:
            del pool[oid]
        return True

    def flush_object(self, pool_id: int, oid: Oid, *, client: int = LOCAL_CLIENT) -> int:
        pool = self._pool(pool_id, client)
        self._check(oid, 0)
        obj = pool.pop(oid, {})
        self._used -= sum(map(len, obj.values()))
        return len(obj)

    def destroy_pool(self, pool_id: int, *, client: int = LOCAL_CLIENT) -> int:
        pool = self._pool(pool_id, client)
        n = sum(len(o) for o in pool.values())
        for oid in list(pool):
            self.flush_object(pool_id, oid, client=client)
        del self._pools[(client, pool_id)]
        return n

    def zombify_lru(self, persistent: bool) -> list[ZombiePage]:
        return []

    def lookup(self, pool_id: int, oid: Oid, index: int, *, client: int = LOCAL_CLIENT) -> object:
        raise RemotePageError(None)

    def stats(self) -> dict[str, int | float]:
        return {"frames_total": self.frames_total}
