"""Per-page loops of remote put/get, kept flat so mypyc can compile them.

Everything here runs once per page of a batch, on the node serving a peer
(store, fetch, reply building) and on the node sending (wire items, results).
``setup.py`` compiles this module with mypyc together with zcache, so the calls
into :class:`~tmem.zcache.Zcache` are direct C calls and the loops avoid the
interpreter; as pure Python the same code runs unchanged. The policy (which
pools a client may use, the reserve) stays with the callers in
:mod:`tmem.ramster.remotify` and :mod:`tmem.ramster.transport`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from tmem.compress import PAGE_SIZE
from tmem.errors import TmemError
from tmem.zcache import PutResult, Zcache

from .wire import Buffer, GetResult, PageKey, PutItem

Oid = tuple[int, int, int]
Key = tuple[int, Oid, int]  # (pool_id, oid, index) in the owner's numbering
Blob = tuple[bytes, bool]  # a page's stored form: (data, compressed)
# Keys handed in by callers are typed loosely on purpose: compiled, a malformed key
# must reach Zcache's own checks (InvalidHandleError, answered per page), not fail
# mypyc's argument type check with a TypeError.
KeyArg = tuple[Any, Any, Any]

# NamedTuples built without their Python-level __new__ (as the wire decoder does)
_tnew = tuple.__new__

# remotify.PutStatus values (wire values), repeated here to keep this module leaf-level.
STORED: Final = 0
FULL: Final = 1
POOR: Final = 2
BAD: Final = 3


def store_pages(
    zc: Zcache,
    client: int,
    items: Iterable[tuple[KeyArg, bytes, bool]],
    pool_ok: Callable[[int], bool],
    low_frames: int,
) -> tuple[list[int], int]:
    """Store a peer's pages in their stored form; (status per page, pages refused
    for room). ``pool_ok(pool_id)`` is asked once per pool of the batch; pages are
    refused (FULL) while free frames are at or under ``low_frames``."""
    out: list[int] = []
    seen: dict[int, bool] = {}
    refused = 0
    for key, data, compressed in items:
        pool_id, oid, index = key
        ok = seen.get(pool_id)
        if ok is None:
            ok = pool_ok(pool_id)
            seen[pool_id] = ok
        n = len(data)
        if not ok or n > PAGE_SIZE or (not compressed and n != PAGE_SIZE):
            out.append(BAD)
            continue
        if zc.frames_free <= low_frames:
            refused += 1
            out.append(FULL)
            continue
        try:
            st = zc.put_compressed(pool_id, oid, index, data, client=client, compressed=compressed)
        except TmemError:
            out.append(BAD)
            continue
        if st == PutResult.STORED:
            out.append(STORED)
        elif st == PutResult.NO_MEMORY:
            refused += 1
            out.append(FULL)
        else:
            out.append(POOR)
    return out, refused


def fetch_pages(
    zc: Zcache, client: int, pools: set[int], keys: Iterable[KeyArg], free: bool
) -> list[Blob | None]:
    """A peer's pages in their stored form; None for a miss or a pool not in ``pools``."""
    keys = list(keys)
    if keys and not free:
        # The usual batch: one pool, nothing removed. A bad key raises before anything
        # changed, and then the per-page loop below answers it as a miss.
        pool_id = keys[0][0]
        if pool_id in pools and all(k[0] == pool_id for k in keys):
            try:
                return zc.get_compressed_many(
                    pool_id, [(k[1], k[2]) for k in keys], False, client=client
                )
            except TmemError:
                pass
    out: list[Blob | None] = []
    for key in keys:
        pool_id, oid, index = key
        if pool_id not in pools:
            out.append(None)
            continue
        try:
            out.append(zc.get_compressed(pool_id, oid, index, free, client=client))
        except TmemError:
            out.append(None)
    return out


# ------------------------------------------------------------ wire <-> handler


def put_entries(items: Sequence[PutItem]) -> tuple[list[tuple[Key, bytes, bool]], bool, bool]:
    """A decoded PutBatch as handler items; (items, persistent, all of one class).

    Page data are copied out of the receive buffer here (the store keeps bytes)."""
    out: list[tuple[Key, bytes, bool]] = []
    persistent = bool(items) and items[0].key.persistent
    same = True
    for it in items:
        k = it.key
        if k.persistent is not persistent:
            same = False
        out.append(((k.pool_id, k.oid, k.index), bytes(it.data), it.compressed))
    return out, persistent, same


def key_tuples(keys: Sequence[PageKey]) -> list[Key]:
    """PageKeys of a GetBatch as (pool_id, oid, index)."""
    return [(k[1], k[3], k[4]) for k in keys]


def get_results(keys: Sequence[PageKey], pages: Sequence[Blob | None]) -> list[GetResult]:
    """Pair a GetBatch's keys with the handler's answers, in order."""
    if len(keys) != len(pages):
        raise ValueError("one answer per key")
    return [
        _tnew(GetResult, (k, None, True)) if p is None else _tnew(GetResult, (k, p[0], p[1]))
        for k, p in zip(keys, pages, strict=True)
    ]


def put_items(
    node: int, persistent: bool, items: Iterable[tuple[Key, Buffer, bool]]
) -> list[PutItem]:
    """Handler-format pages of ``node`` as wire PutItems."""
    return [
        _tnew(PutItem, (_tnew(PageKey, (node, k[0], persistent, k[1], k[2])), d, c))
        for k, d, c in items
    ]


def page_keys(node: int, keys: Sequence[Key], start: int, end: int) -> list[PageKey]:
    """``keys[start:end]`` of ``node`` as persistent-class wire PageKeys (get batches)."""
    return [_tnew(PageKey, (node, k[0], True, k[1], k[2])) for k in keys[start:end]]


def blobs(items: Sequence[GetResult]) -> list[Blob | None]:
    """A GetBatchReply's pages as owned bytes (None = miss)."""
    return [None if it[1] is None else (bytes(it[1]), it[2]) for it in items]
