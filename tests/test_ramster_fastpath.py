"""The per-page loops of remote put/get (tmem.ramster.fastpath) and Zcache.get_compressed_many."""

from __future__ import annotations

import os
import random

import pytest

from tmem.errors import InvalidHandleError
from tmem.ramster import fastpath, wire
from tmem.zcache import Zcache

OID = (5, 0, 9)


def _store(zc: Zcache, client: int, pool: int, huge: bool = True) -> dict[int, bytes]:
    """Pages of every stored form: compressed, same-filled, huge (raw, persistent only)."""
    rng = random.Random(3)
    pages = {i: rng.randbytes(1024) + bytes(3072) for i in range(40)}
    pages[40] = bytes(4096)  # same-filled (zero)
    pages[41] = b"\x07" * 4096  # same-filled pattern
    if huge:
        pages[42] = os.urandom(4096)  # incompressible: huge page (stored raw)
    for i, p in pages.items():
        assert zc.put_compressed(pool, OID, i, p, client=client, compressed=False).name == "STORED"
    return pages


@pytest.mark.parametrize("persistent", [True, False])
def test_get_compressed_many_matches_get_compressed(persistent: bool) -> None:
    zc = Zcache("4MiB", huge_pages=True, prefault=False)
    pool = zc.new_pool(persistent=persistent, client=3, pool_id=2)
    pages = _store(zc, 3, pool, huge=persistent)
    keys = [(OID, i) for i in [*pages, 99]] + [((1, 1, 1), 0)]
    many = zc.get_compressed_many(pool, keys, False, client=3)
    one = [zc.get_compressed(pool, o, i, False, client=3) for o, i in keys]
    assert many == one
    assert many[-1] is None and many[-2] is None
    for (o, i), got in zip(keys, many, strict=True):
        if o == OID and i in pages:
            assert got is not None
            data, compressed = got
            assert (zc.decompress(data) if compressed else data) == pages[i]


def test_get_compressed_many_frees_and_refuses_bad_handles() -> None:
    zc = Zcache("4MiB", huge_pages=True, prefault=False)
    pool = zc.new_pool(persistent=True, client=3, pool_id=0)
    pages = _store(zc, 3, pool)
    got = zc.get_compressed_many(pool, [(OID, 0), (OID, 41)], True, client=3)
    assert all(g is not None for g in got)
    assert zc.get_compressed_many(pool, [(OID, 0), (OID, 41)], False, client=3) == [None, None]
    assert zc.get_compressed(pool, OID, 1, client=3) is not None  # the rest stays
    with pytest.raises(InvalidHandleError):
        zc.get_compressed_many(pool, [(OID, 1), ([1, 2, 3], 0)], False, client=3)
    with pytest.raises(InvalidHandleError):
        zc.get_compressed_many(pool, [((1, 2), 0)], False, client=3)
    assert len(pages) == 43


def test_fetch_pages_answers_bad_keys_and_foreign_pools_as_misses() -> None:
    zc = Zcache("4MiB", huge_pages=True, prefault=False)
    pool = zc.new_pool(persistent=True, client=3, pool_id=1)
    pages = _store(zc, 3, pool)
    keys = [(pool, OID, 0), (pool, (1, 2), 0), (pool, OID, 2), (7, OID, 3)]
    got = fastpath.fetch_pages(zc, 3, {pool}, keys, False)  # type: ignore[arg-type]
    assert got[1] is None and got[3] is None
    for k, g in ((0, got[0]), (2, got[2])):
        assert g is not None and zc.decompress(g[0]) == pages[k]
    # get-and-free goes page by page: a bad key in the middle loses nothing
    got = fastpath.fetch_pages(zc, 3, {pool}, keys, True)  # type: ignore[arg-type]
    assert got[0] is not None and got[2] is not None and got[1] is None
    assert fastpath.fetch_pages(zc, 3, {pool}, [(pool, OID, 0)], False) == [None]
    assert fastpath.fetch_pages(zc, 3, {pool}, [], False) == []


def test_wire_conversions_round_trip() -> None:
    keys = [(1, (2, 3, 4), i) for i in range(5)]
    pks = fastpath.page_keys(9, keys, 1, 4)
    assert pks == [wire.PageKey(9, 1, True, (2, 3, 4), i) for i in range(1, 4)]
    assert fastpath.key_tuples(pks) == keys[1:4]
    res = fastpath.get_results(pks, [(b"a", True), None, (b"c", False)])
    assert res == [
        wire.GetResult(pks[0], b"a", True),
        wire.GetResult(pks[1], None, True),
        wire.GetResult(pks[2], b"c", False),
    ]
    assert fastpath.blobs(res) == [(b"a", True), None, (b"c", False)]
    with pytest.raises(ValueError):
        fastpath.get_results(pks, [None])
    items = fastpath.put_items(9, False, [(k, b"x", True) for k in keys[:2]])
    assert items == [
        wire.PutItem(wire.PageKey(9, 1, False, (2, 3, 4), i), b"x", True) for i in (0, 1)
    ]
    entries, persistent, same = fastpath.put_entries(items)
    assert entries == [(k, b"x", True) for k in keys[:2]] and persistent is False and same
    mixed = [items[0], wire.PutItem(items[1].key._replace(persistent=True), b"y")]
    assert fastpath.put_entries(mixed)[2] is False
