"""tmem core: pools -> objects (192-bit oid) -> page index -> pampd.

The core never touches page data (kernel-zcache2.md section 1). A backend creates a
pampd (an opaque handle: a non-negative int for a page it stores, a negative int for a
same-filled page, any other object for a page that lives on another node) and the core
maps a handle ``(pool, oid, index)`` to it. When the core drops a pampd (flush,
duplicate put, object flush, pool destroy) it hands it to the backend's
:meth:`PamOps.free`.

The kernel's objects hold a 64-way radix tree of machine words; here an object holds a
dict of 64-slot ``array`` nodes (4 bytes a slot), so a block device or a swap area (one
object of millions of consecutive indexes) costs about 5 bytes per page and no Python
object per page. A pampd that does not fit a slot (a remote one, a large negative one)
is kept in the object's small ``extra`` dict, its slot marked :data:`EXTRA`.

Each object also has a number (:attr:`Obj.num`), so a backend can name a page by two
small ints (object number, index) in its own per-page columns and find its way back
(reclaim) through :meth:`Tmem.obj`.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable, Iterator
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

NODE_SHIFT: Final = 6
NODE_SLOTS: Final = 1 << NODE_SHIFT  # 64 slots a node, as the kernel's objnode
NODE_MASK: Final = NODE_SLOTS - 1
EMPTY: Final = -1  # a slot with no page
EXTRA: Final = -(1 << 31)  # the pampd is in Obj.extra
SLOT_MIN: Final = EXTRA + 1  # slots hold pampds in SLOT_MIN + 1 .. 2**31 - 1, shifted
SLOT_MAX: Final = (1 << 31) - 1
_EMPTY_NODE: Final = array("i", [EMPTY]) * NODE_SLOTS
# Bytes one node costs (array header + 64 slots + its entry in the nodes dict, about).
NODE_BYTES: Final = sys.getsizeof(array("i", _EMPTY_NODE)) + 40
OBJ_BYTES: Final = 72 + 64 + 64 + 100  # Obj, its oid tuple, its nodes dict, objects entry
EXTRA_BYTES: Final = 100  # an extra dict entry, its int key and a share of the dict


class PamOps(Protocol):
    """What the core asks of the backend that owns the data."""

    def free(self, pool: Pool, oid: Oid | None, index: int, pampd: Pampd) -> None:
        """Release storage for a pampd tmem no longer references."""
        ...


def _to_slot(pampd: Pampd) -> int:
    """The slot value for ``pampd``, or EXTRA when it must go to the extra dict.

    Non-negative ints are stored as they are; negative ones one lower, so that -1 can
    mean an empty slot."""
    if type(pampd) is int:
        if 0 <= pampd <= SLOT_MAX:
            return pampd
        if SLOT_MIN < pampd < 0:
            return pampd - 1
    return EXTRA


class Obj:
    """One tmem object: its pages' pampds, by index, in 64-slot array nodes."""

    __slots__ = ("count", "extra", "nodes", "num", "oid", "pool")

    def __init__(self, pool: Pool, oid: Oid, num: int) -> None:
        self.pool = pool
        self.oid = oid
        self.num = num
        self.count = 0  # pages mapped
        self.nodes: dict[int, array[int]] = {}
        self.extra: dict[int, Pampd] | None = None

    def get(self, index: int) -> Pampd | None:
        node = self.nodes.get(index >> NODE_SHIFT)
        if node is None:
            return None
        slot = node[index & NODE_MASK]
        if slot >= 0:
            return slot
        if slot == EMPTY:
            return None
        if slot == EXTRA:
            assert self.extra is not None
            return self.extra[index]
        return slot + 1

    def slot(self, index: int) -> int:
        """The raw slot: a stored int pampd >= 0 as it is; EMPTY; or < EMPTY for others
        (decode with :meth:`get`). The hot paths' cheap look."""
        node = self.nodes.get(index >> NODE_SHIFT)
        return EMPTY if node is None else node[index & NODE_MASK]

    def set(self, index: int, pampd: Pampd) -> Pampd | None:
        """Map ``index`` to ``pampd``; return the pampd it replaced, or None."""
        new_slot = _to_slot(pampd)
        old_slot = self.set_handle(index, new_slot)
        old = None if old_slot == EMPTY else self.decode_old(index, old_slot)
        if new_slot == EXTRA:
            if self.extra is None:
                self.extra = {}
            self.extra[index] = pampd
            self.pool.tmem_extras += 1
        return old

    def set_handle(self, index: int, handle: int) -> int:
        """Write a raw slot (a non-negative int pampd, 0..2**31-1, as it is), returning
        the old raw slot: the put hot path. The caller decodes an old slot other than
        EMPTY with :meth:`decode_old` before anything else changes the object."""
        key = index >> NODE_SHIFT
        node = self.nodes.get(key)
        if node is None:
            node = self.nodes[key] = array("i", _EMPTY_NODE)
            self.pool.tmem_nodes += 1
        pos = index & NODE_MASK
        old = node[pos]
        node[pos] = handle
        if old == EMPTY:
            self.count += 1
        return old

    def decode_old(self, index: int, old_slot: int) -> Pampd:
        """The pampd an old raw slot (from :meth:`set_handle`, not EMPTY) stood for."""
        if old_slot >= 0:
            return old_slot
        if old_slot == EXTRA:
            assert self.extra is not None
            self.pool.tmem_extras -= 1
            return self.extra.pop(index)
        return old_slot + 1

    def pop(self, index: int) -> Pampd | None:
        """Unmap ``index``; return its pampd (None if there was none)."""
        key = index >> NODE_SHIFT
        node = self.nodes.get(key)
        if node is None:
            return None
        pos = index & NODE_MASK
        slot = node[pos]
        if slot == EMPTY:
            return None
        node[pos] = EMPTY
        self.count -= 1
        if slot >= 0:
            out: Pampd = slot
        elif slot == EXTRA:
            assert self.extra is not None
            out = self.extra.pop(index)
            self.pool.tmem_extras -= 1
        else:
            out = slot + 1
        if node == _EMPTY_NODE:
            del self.nodes[key]
            self.pool.tmem_nodes -= 1
        return out

    def items(self) -> Iterator[tuple[int, Pampd]]:
        """(index, pampd) of every page, in index order within each node."""
        for key, node in list(self.nodes.items()):
            base = key << NODE_SHIFT
            for pos, slot in enumerate(node):
                if slot == EMPTY:
                    continue
                index = base + pos
                if slot >= 0:
                    yield index, slot
                elif slot == EXTRA:
                    assert self.extra is not None
                    yield index, self.extra[index]
                else:
                    yield index, slot + 1

    def run(self, first: int, count: int) -> list[int]:
        """The raw slots of ``count`` consecutive indexes from ``first`` (EMPTY where no
        page): a block device read looks up a run at once."""
        out: list[int] = []
        index = first
        end = first + count
        nodes = self.nodes
        while index < end:
            key = index >> NODE_SHIFT
            pos = index & NODE_MASK
            take = min(NODE_SLOTS - pos, end - index)
            node = nodes.get(key)
            if node is None:
                out.extend([EMPTY] * take)
            else:
                out.extend(node[pos : pos + take])
            index += take
        return out


class Pool:
    """A tmem pool: ephemeral (may drop pages) or persistent (keeps what it accepted)."""

    __slots__ = (
        "client",
        "objects",
        "persistent",
        "pool_id",
        "shared",
        "tmem_extras",
        "tmem_nodes",
        "users",
        "uuid",
    )

    def __init__(
        self, client: int, pool_id: int, persistent: bool, shared: bool, uuid: bytes | None
    ) -> None:
        self.client = client
        self.pool_id = pool_id
        self.persistent = persistent
        self.shared = shared
        self.uuid = uuid
        self.users = 1  # shared pools: how many new_pool calls named this uuid
        self.objects: dict[Oid, Obj] = {}
        self.tmem_nodes = 0  # index nodes of all its objects (for metadata counts)
        self.tmem_extras = 0  # pampds kept in its objects' extra dicts

    def page_count(self) -> int:
        return sum(obj.count for obj in self.objects.values())

    def items(self) -> Iterator[tuple[Oid, int, Pampd]]:
        """(oid, index, pampd) of every page (a snapshot per object)."""
        for oid, obj in list(self.objects.items()):
            for index, pampd in list(obj.items()):
                yield oid, index, pampd

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
    """The pool table, the handle -> pampd map and the object numbers."""

    def __init__(self, pamops: PamOps) -> None:
        self.pamops = pamops
        self.clients: dict[int, list[Pool | None]] = {LOCAL_CLIENT: [None] * MAX_POOLS_PER_CLIENT}
        self._shared: dict[tuple[int, bytes], Pool] = {}
        self.local = self.clients[LOCAL_CLIENT]
        self.local_by_id: dict[int, Pool] = {}  # the hot paths' view of the local pools
        self._objs: list[Obj | None] = []  # by object number
        self._free_nums = array("i")

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

    # ---- objects ---------------------------------------------------------------------

    def obj_for_put(self, pool: Pool, oid: Oid) -> Obj:
        """The object ``oid`` of ``pool``, created (numbered) if it has no page yet."""
        obj = pool.objects.get(oid)
        if obj is None:
            if self._free_nums:
                num = self._free_nums.pop()
                obj = Obj(pool, oid, num)
                self._objs[num] = obj
            else:
                num = len(self._objs)
                obj = Obj(pool, oid, num)
                self._objs.append(obj)
            pool.objects[oid] = obj
        return obj

    def drop_if_empty(self, obj: Obj) -> None:
        """Forget an object with no page left (an object exists while it has pages)."""
        if obj.count == 0 and obj.pool.objects.get(obj.oid) is obj:
            del obj.pool.objects[obj.oid]
            self._release(obj)

    def _release(self, obj: Obj) -> None:
        self._objs[obj.num] = None
        self._free_nums.append(obj.num)
        obj.pool.tmem_nodes -= len(obj.nodes)
        if obj.extra:
            obj.pool.tmem_extras -= len(obj.extra)

    def obj(self, num: int) -> Obj | None:
        """The live object numbered ``num``, or None."""
        return self._objs[num] if 0 <= num < len(self._objs) else None

    def object_count(self) -> int:
        return len(self._objs) - len(self._free_nums)

    def metadata_bytes(self) -> int:
        """Bytes of the index (objects, nodes, extra entries, the tables), from counts:
        O(pools), cheap enough to ask on the put path now and then."""
        total = sys.getsizeof(self._objs) + self._free_nums.buffer_info()[1] * 4
        for pool in self.pools():
            total += sys.getsizeof(pool.objects) + pool.tmem_nodes * NODE_BYTES
            total += len(pool.objects) * OBJ_BYTES + pool.tmem_extras * EXTRA_BYTES
        return total

    # ---- pages -----------------------------------------------------------------------

    def put(self, pool: Pool, oid: Oid, index: int, pampd: Pampd) -> None:
        """Map the handle to ``pampd``; a previous page under the handle is freed."""
        obj = self.obj_for_put(pool, oid)
        old = obj.set(index, pampd)
        if old is not None:
            self.pamops.free(pool, oid, index, old)

    def lookup(self, pool: Pool, oid: Oid, index: int) -> Pampd | None:
        obj = pool.objects.get(oid)
        return None if obj is None else obj.get(index)

    def remove(self, pool: Pool, oid: Oid, index: int) -> Pampd | None:
        """Unmap the handle without freeing its pampd (the caller owns it now)."""
        obj = pool.objects.get(oid)
        if obj is None:
            return None
        pampd = obj.pop(index)
        if obj.count == 0:
            del pool.objects[oid]
            self._release(obj)
        return pampd

    def flush_page(self, pool: Pool, oid: Oid, index: int) -> bool:
        pampd = self.remove(pool, oid, index)
        if pampd is None:
            return False
        self.pamops.free(pool, oid, index, pampd)
        return True

    def flush_object(self, pool: Pool, oid: Oid) -> int:
        obj = pool.objects.pop(oid, None)
        if obj is None:
            return 0
        self._release(obj)
        free = self.pamops.free
        count = 0
        for index, pampd in list(obj.items()):
            free(pool, oid, index, pampd)
            count += 1
        obj.nodes.clear()
        obj.count = 0
        return count

    def replace(
        self, pool: Pool, oid: Oid, index: int, new: Pampd, expect: Callable[[Pampd], bool]
    ) -> bool:
        """Swap the handle's pampd for ``new`` if ``expect(current)``; free the old one."""
        obj = pool.objects.get(oid)
        if obj is None:
            return False
        old = obj.get(index)
        if old is None or not expect(old):
            return False
        obj.set(index, new)
        self.pamops.free(pool, oid, index, old)
        return True
