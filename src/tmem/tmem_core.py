"""tmem core: pools -> objects (192-bit oid) -> page index -> pampd.

The core never touches page data (kernel-zcache2.md section 1). A backend creates a
pampd (an opaque handle: an int for a local zbud, a negative int for a same-filled
page, any other object for a page that lives on another node) and the core maps a
handle ``(pool, oid, index)`` to it. When the core drops a pampd (flush, duplicate put,
object flush, pool destroy) it hands it to the backend's :meth:`PamOps.free`.

The kernel's 256 hash buckets of red-black trees, each object holding a 64-way radix
tree, become one dict of objects per pool and one dict of pages per object: the same
behaviour (cheap object and pool flushes, an object disappears with its last page) with
far less Python overhead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol

from tmem.errors import InvalidHandleError, PoolLimitError, UnknownPoolError

Oid = tuple[int, int, int]
Pampd = object
LOCAL_CLIENT: Final = 0xFFFF
MAX_POOLS_PER_CLIENT: Final = 16
MAX_CLIENTS: Final = 256  # RAMster node numbers are 0..254; the kernel allowed 16 foreign clients
U64_MAX = (1 << 64) - 1
U32_MAX: Final = (1 << 32) - 1
INVALID_OID: Oid = (U64_MAX, U64_MAX, U64_MAX)


class PamOps(Protocol):
    """What the core asks of the backend that owns the data."""

    def free(self, pool: Pool, oid: Oid | None, index: int, pampd: Pampd) -> None:
        """Release storage for a pampd tmem no longer references."""
        ...


class Pool:
    """A tmem pool: ephemeral (may drop pages) or persistent (keeps what it accepted)."""

    __slots__ = ("client", "objects", "persistent", "pool_id", "shared", "users", "uuid")

    def __init__(
        self, client: int, pool_id: int, persistent: bool, shared: bool, uuid: bytes | None
    ) -> None:
        self.client = client
        self.pool_id = pool_id
        self.persistent = persistent
        self.shared = shared
        self.uuid = uuid
        self.users = 1  # shared pools: how many new_pool calls named this uuid
        self.objects: dict[Oid, dict[int, Pampd]] = {}

    def page_count(self) -> int:
        return sum(len(pages) for pages in self.objects.values())

    def __repr__(self) -> str:
        kind = "persistent" if self.persistent else "ephemeral"
        return (
            f"<Pool client={self.client:#x} id={self.pool_id} {kind} objects={len(self.objects)}>"
        )


def check_oid(oid: object) -> Oid:
    """Validate a 192-bit object id: a tuple of three unsigned 64-bit ints."""
    if (
        type(oid) is tuple
        and len(oid) == 3
        and all(type(w) is int and 0 <= w <= U64_MAX for w in oid)
    ):
        if oid == INVALID_OID:
            raise InvalidHandleError("oid (2**64-1, 2**64-1, 2**64-1) is tmem's invalid oid")
        return oid
    raise InvalidHandleError(f"oid must be a tuple of three ints in 0..2**64-1, got {oid!r}")


def check_index(index: object) -> int:
    """Validate a page index: an unsigned 32-bit int."""
    if type(index) is int and 0 <= index <= U32_MAX:
        return index
    raise InvalidHandleError(f"page index must be an int in 0..2**32-1, got {index!r}")


class Tmem:
    """The pool table and the handle -> pampd map."""

    def __init__(self, pamops: PamOps) -> None:
        self.pamops = pamops
        self.clients: dict[int, list[Pool | None]] = {LOCAL_CLIENT: [None] * MAX_POOLS_PER_CLIENT}
        self._shared: dict[tuple[int, bytes], Pool] = {}
        self.local = self.clients[LOCAL_CLIENT]
        self.local_by_id: dict[int, Pool] = {}  # the hot paths' view of the local pools

    # ---- pools -----------------------------------------------------------------------

    def new_pool(
        self,
        persistent: bool,
        shared: bool = False,
        uuid: Any = None,
        client: int = LOCAL_CLIENT,
        pool_id: Any = None,
    ) -> Pool:
        if client != LOCAL_CLIENT and not (0 <= client < MAX_CLIENTS):
            raise InvalidHandleError(f"client must be a node number 0..{MAX_CLIENTS - 1}")
        if shared:
            if uuid is None or len(uuid) != 16:
                raise InvalidHandleError("a shared pool needs a 16-byte uuid")
            uuid = bytes(uuid)
            existing = self._shared.get((client, uuid))
            if existing is not None:
                if existing.persistent != persistent:
                    raise InvalidHandleError("shared pool exists with the other persistence")
                existing.users += 1
                return existing
        slots = self.clients.setdefault(client, [None] * MAX_POOLS_PER_CLIENT)
        if pool_id is None:
            try:
                pool_id = slots.index(None)
            except ValueError:
                raise PoolLimitError(
                    f"all {MAX_POOLS_PER_CLIENT} pool slots of client {client:#x} are in use"
                ) from None
        elif not (type(pool_id) is int and 0 <= pool_id < MAX_POOLS_PER_CLIENT):
            raise InvalidHandleError(f"pool id must be 0..{MAX_POOLS_PER_CLIENT - 1}")
        elif slots[pool_id] is not None:
            raise InvalidHandleError(f"pool {pool_id} of client {client:#x} already exists")
        pool = Pool(client, pool_id, persistent, shared, uuid if shared else None)
        slots[pool_id] = pool
        if client == LOCAL_CLIENT:
            self.local_by_id[pool_id] = pool
        if shared and uuid is not None:
            self._shared[(client, uuid)] = pool
        return pool

    def pool(self, pool_id: Any, client: int = LOCAL_CLIENT) -> Pool:
        """The live pool ``pool_id`` of ``client``, or :class:`UnknownPoolError`."""
        pool = None
        if type(pool_id) is int and 0 <= pool_id < MAX_POOLS_PER_CLIENT:
            slots = self.clients.get(client)
            pool = None if slots is None else slots[pool_id]
        if pool is None:
            raise UnknownPoolError(f"no pool {pool_id!r} for client {client:#x}")
        return pool

    def find_pool(self, pool_id: int, client: int) -> Pool | None:
        slots = self.clients.get(client)
        if slots is None or not (0 <= pool_id < MAX_POOLS_PER_CLIENT):
            return None
        return slots[pool_id]

    def pools(self) -> list[Pool]:
        return [p for slots in self.clients.values() for p in slots if p is not None]

    def destroy_pool(self, pool: Pool) -> int:
        """Flush every page of ``pool`` and free its slot; returns pages flushed.

        A shared pool is only torn down when its last user destroys it.
        """
        if pool.shared and pool.users > 1:
            pool.users -= 1
            return 0
        count = 0
        for oid in list(pool.objects):
            count += self.flush_object(pool, oid)
        self.clients[pool.client][pool.pool_id] = None
        if pool.client == LOCAL_CLIENT:
            del self.local_by_id[pool.pool_id]
        if pool.shared and pool.uuid is not None:
            self._shared.pop((pool.client, pool.uuid), None)
        return count

    # ---- pages -----------------------------------------------------------------------

    def put(self, pool: Pool, oid: Oid, index: int, pampd: Pampd) -> None:
        """Map the handle to ``pampd``; a previous page under the handle is freed."""
        pages = pool.objects.get(oid)
        if pages is None:
            pool.objects[oid] = {index: pampd}
            return
        old = pages.get(index)
        pages[index] = pampd
        if old is not None:
            self.pamops.free(pool, oid, index, old)

    def lookup(self, pool: Pool, oid: Oid, index: int) -> Pampd | None:
        pages = pool.objects.get(oid)
        return None if pages is None else pages.get(index)

    def remove(self, pool: Pool, oid: Oid, index: int) -> Pampd | None:
        """Unmap the handle without freeing its pampd (the caller owns it now)."""
        pages = pool.objects.get(oid)
        if pages is None:
            return None
        pampd = pages.pop(index, None)
        if not pages:
            del pool.objects[oid]
        return pampd

    def flush_page(self, pool: Pool, oid: Oid, index: int) -> bool:
        pampd = self.remove(pool, oid, index)
        if pampd is None:
            return False
        self.pamops.free(pool, oid, index, pampd)
        return True

    def flush_object(self, pool: Pool, oid: Oid) -> int:
        pages = pool.objects.pop(oid, None)
        if pages is None:
            return 0
        free = self.pamops.free
        for index, pampd in pages.items():
            free(pool, oid, index, pampd)
        return len(pages)

    def replace(
        self, pool: Pool, oid: Oid, index: int, new: Pampd, expect: Callable[[Pampd], bool]
    ) -> bool:
        """Swap the handle's pampd for ``new`` if ``expect(current)``; free the old one."""
        pages = pool.objects.get(oid)
        if pages is None:
            return False
        old = pages.get(index)
        if old is None or not expect(old):
            return False
        pages[index] = new
        self.pamops.free(pool, oid, index, old)
        return True
