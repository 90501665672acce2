"""The tmem index: objects of 64-slot array nodes, pampds that do not fit a slot kept
aside, object numbers a backend can name pages by."""

from __future__ import annotations

from tmem.tmem_core import EMPTY, EXTRA, NODE_SLOTS, Pampd, Pool, Tmem


class Freed:
    def __init__(self) -> None:
        self.freed: list[tuple[int, Pampd]] = []

    def free(self, pool: Pool, oid: object, index: int, pampd: Pampd) -> None:
        self.freed.append((index, pampd))


def test_slots_hold_small_ints_and_extras_hold_the_rest() -> None:
    ops = Freed()
    tm = Tmem(ops)
    pool = tm.new_pool(True)
    remote = object()
    values: dict[int, Pampd] = {
        0: 5,  # a handle
        1: -1,  # a zero page's pattern pampd
        2: -1 - 0x0101010101010101,  # a large pattern: does not fit a slot
        3: remote,  # a remote page
        70: (1 << 31) - 1,  # the largest slot value, in a second node
        5000: 2**40,  # too big for a slot
    }
    for index, pampd in values.items():
        tm.put(pool, (1, 2, 3), index, pampd)
    obj = pool.objects[(1, 2, 3)]
    assert obj.count == len(values) and len(obj.nodes) == 3
    assert pool.tmem_extras == 3 and pool.tmem_nodes == 3
    for index, pampd in values.items():
        assert tm.lookup(pool, (1, 2, 3), index) == pampd
    assert dict(obj.items()) == values
    assert obj.run(0, 6) == [5, -2, EXTRA, EXTRA, EMPTY, EMPTY]  # raw slots
    tm.put(pool, (1, 2, 3), 3, 7)  # a local page replaces the remote one: it is freed
    assert ops.freed == [(3, remote)] and pool.tmem_extras == 2
    assert tm.flush_object(pool, (1, 2, 3)) == len(values)
    assert pool.objects == {} and pool.tmem_nodes == 0 and pool.tmem_extras == 0


def test_nodes_come_and_go_with_their_pages() -> None:
    tm = Tmem(Freed())
    pool = tm.new_pool(True)
    for index in range(3 * NODE_SLOTS):
        tm.put(pool, (0, 0, 1), index, index)
    assert pool.tmem_nodes == 3
    for index in range(NODE_SLOTS, 2 * NODE_SLOTS):  # empty the middle node
        assert tm.remove(pool, (0, 0, 1), index) == index
    assert pool.tmem_nodes == 2 and pool.page_count() == 2 * NODE_SLOTS
    assert tm.lookup(pool, (0, 0, 1), NODE_SLOTS) is None


def test_object_numbers_are_reused_and_name_live_objects() -> None:
    tm = Tmem(Freed())
    pool = tm.new_pool(False)
    a = tm.obj_for_put(pool, (0, 0, 1))
    a.set(0, 1)
    b = tm.obj_for_put(pool, (0, 0, 2))
    b.set(0, 2)
    assert (a.num, b.num) == (0, 1) and tm.obj(1) is b and tm.object_count() == 2
    tm.flush_page(pool, (0, 0, 1), 0)  # its last page: the object and its number go
    assert tm.obj(0) is None and tm.object_count() == 1
    c = tm.obj_for_put(pool, (0, 0, 3))
    assert c.num == 0 and tm.obj(0) is c
