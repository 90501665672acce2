"""Replay real pages through an embedded Zcache and a naive dict, in the same run.

The baseline is what anyone would write first: ``dict[(oid, index)] ->
lz4.block.compress(page, store_size=False)`` (with ``--compressor lzo|zstd`` the
dict uses that codec too). It has no budget, no eviction and
no allocator, so it is the cost floor of "compress and remember" in Python;
zcache's numbers are only meaningful as ratios against it, measured on the same
pages, in the same order, in the same process.

Equal work on both sides. The dict keeps every page it is given; zcache refuses
some (compressed too poorly for its class, or no room in the budget). A refused
page does not vanish: the caller must keep it somewhere, so the zcache contender
is zcache *plus* a caller-side ``dict[(oid, index)] -> raw page`` for what it
refused. Every timed put and get is over the same ``n`` pages on both sides, a
get of a refused page is served from that fallback, and density is

    density = original bytes of ALL offered pages / bytes the contender holds

where zcache holds its frames + its metadata + the fallback (4096 B per refused
page + that dict's own bytes). A refused page is therefore counted against
zcache (raw, ratio 1.0), never dropped from its side.

Phases:

* put-all / get-all: every page into a persistent pool (budget large enough
  unless ``memory`` says otherwise), then every page back; timed against the
  dict, interleaved chunk by chunk. Pages read back are compared with the
  originals (untimed). There is no batch row: ``Zcache.put_many``/``get_many``
  are loops over ``put``/``get`` and would only time the same work again.
* density: a separate, untimed pass with ``tracemalloc`` running measures the
  Python objects each store keeps alive (arena excluded: it is an mmap made
  before tracing starts; zcache's frames used are charged at 4096 B each). The
  engine's own ``metadata_bytes`` estimate is reported next to it.
* mixed: a third of the pages persistent, the rest ephemeral, through a budget
  of half the frames put-all needed, so ouroboros (reclaiming LRU ephemeral
  frames) must run; persistent pages are then verified byte for byte. zcache
  only (the dict has no budget to reclaim within).
"""

from __future__ import annotations

import gc
import statistics
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import lz4.block

from tmem.compress import PAGE_SIZE, get_compressor
from tmem.errors import ConfigError
from tmem.sizes import parse_size
from tmem.zcache import ALLOCATORS, Oid, Zcache

Item = tuple[Oid, int, bytes]
#: called as progress(phase_name, pages_done_in_this_step)
Progress = Callable[[str, int], None]

#: What the put/get rows count; put in the JSON report.
THROUGHPUT_DEFINITION = (
    "put and get pages/s count the same n pages on both sides; a page zcache refuses is "
    "kept raw by the caller (put) and served from there (get), inside zcache's time"
)
#: timers for ``run_bench(clock=...)``
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.thread_time, "wall": time.perf_counter}
CLOCK_NAMES = {"cpu": "thread CPU time", "wall": "wall clock"}
_CHUNK = 4096  # pages per timed chunk; contenders alternate between chunks
_SWIZ = 8


def engine_kind() -> str:
    """ "mypyc-compiled" or "pure Python": which zcache build the numbers are for."""
    import tmem.zcache

    path = getattr(tmem.zcache, "__file__", "") or ""
    return "pure Python" if path.endswith(".py") else "mypyc-compiled"


def make_items(pages: Sequence[bytes], n: int) -> list[Item]:
    """``n`` (oid, index, page) triples, repeating ``pages``; keys as frontswap swizzles them."""
    m = len(pages)
    return [((i & 0xFF, 0, 0), i >> _SWIZ, pages[i % m]) for i in range(n)]


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


# ---- the naive baseline ------------------------------------------------------------


def _dict_put(store: dict[tuple[Oid, int], bytes], items: Sequence[Item]) -> None:
    compress = lz4.block.compress
    for oid, index, page in items:
        store[(oid, index)] = compress(page, store_size=False)


def _dict_get(store: dict[tuple[Oid, int], bytes], items: Sequence[Item]) -> None:
    decompress = lz4.block.decompress
    get = store.get
    for oid, index, _page in items:
        data = get((oid, index))
        if data is not None:
            decompress(data, uncompressed_size=PAGE_SIZE)


@dataclass(frozen=True)
class Baseline:
    """The naive dict cache for one codec: lz4 called directly, others via tmem.compress.

    With another codec the dict uses that codec too, so the ratio measures the
    store, not the codec.
    """

    codec: str
    put: Callable[[dict[tuple[Oid, int], bytes], Sequence[Item]], None]
    get: Callable[[dict[tuple[Oid, int], bytes], Sequence[Item]], None]
    compress: Callable[[bytes], bytes]
    decompress: Callable[[bytes], bytes]


def baseline_for(compressor: str) -> Baseline:
    """The naive dict baseline matching ``compressor``."""
    codec = get_compressor(compressor)
    if codec.name == "lz4":
        return Baseline("lz4", _dict_put, _dict_get, codec.compress, codec.decompress)
    compress, decompress = codec.compress, codec.decompress

    def put(store: dict[tuple[Oid, int], bytes], items: Sequence[Item]) -> None:
        for oid, index, page in items:
            store[(oid, index)] = compress(page)

    def get(store: dict[tuple[Oid, int], bytes], items: Sequence[Item]) -> None:
        lookup = store.get
        for oid, index, _page in items:
            data = lookup((oid, index))
            if data is not None:
                decompress(data)

    return Baseline(codec.name, put, get, compress, decompress)


# ---- zcache loops ------------------------------------------------------------------


def _zc_put(
    zc: Zcache,
    pool: int,
    items: Sequence[Item],
    fails: list[int],
    fallback: dict[tuple[Oid, int], bytes],
) -> None:
    """Put every page; a refused one goes to the caller's raw ``fallback`` (timed too)."""
    put = zc.put
    bad = 0
    for oid, index, page in items:
        if not put(pool, oid, index, page):
            fallback[(oid, index)] = page
            bad += 1
    fails[0] += bad


def _zc_get(
    zc: Zcache, pool: int, items: Sequence[Item], fallback: dict[tuple[Oid, int], bytes]
) -> None:
    """Get every page back: from zcache, or from the fallback if zcache refused it."""
    get = zc.get
    raw = fallback.get
    for oid, index, _page in items:
        if get(pool, oid, index) is None:
            raw((oid, index))


def _verify(
    zc: Zcache,
    pool: int,
    last: dict[tuple[Oid, int], bytes],
    fails: int,
    fallback: dict[tuple[Oid, int], bytes],
) -> bool:
    """Every handle gives back its page, from zcache or from the fallback.

    Exactly ``fails`` pages are missing from zcache, and they are the ones in the
    fallback (``make_items`` never repeats a key, so each refused put is one page).
    """
    missing = 0
    for key, page in last.items():
        got = zc.get(pool, *key)
        if got is None:
            missing += 1
            got = fallback.get(key)
        if got != page:
            return False
    return missing == fails == len(fallback)


@dataclass
class RunResult:
    """One repeat of the put/get phases."""

    dict_put: float
    dict_get: float
    zc_put: float
    zc_get: float
    rejects: int
    verified: bool


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0


def _one_repeat(
    items: Sequence[Item],
    memory: int,
    compressor: str,
    progress: Progress | None,
    verify: bool,
    clock: Callable[[], float] = time.perf_counter,
    allocator: str = "zsmalloc",
) -> tuple[RunResult, Zcache]:
    """One put-all + get-all, the contenders interleaved chunk by chunk.

    Each chunk of pages goes through every contender before the next chunk, the
    order rotating per chunk, so background load and CPU frequency changes hit
    all of them alike instead of whichever happened to run during a busy spell.
    Both sides put and get the same ``len(items)`` pages; zcache's refused pages
    are kept and served by its raw fallback, inside its timing.
    """
    n = len(items)
    base = baseline_for(compressor)
    store: dict[tuple[Oid, int], bytes] = {}
    zc = Zcache(memory=memory, compressor=compressor, allocator=allocator)
    pool = zc.new_pool(persistent=True)
    fallback: dict[tuple[Oid, int], bytes] = {}
    fails = [0]
    secs: dict[str, float] = dict.fromkeys(("dict_put", "dict_get", "zc_put", "zc_get"), 0.0)

    Step = Callable[[Sequence[Item]], object]
    put_steps: list[tuple[str, Step]] = [
        ("dict_put", lambda chunk: base.put(store, chunk)),
        ("zc_put", lambda chunk: _zc_put(zc, pool, chunk, fails, fallback)),
    ]
    get_steps: list[tuple[str, Step]] = [
        ("dict_get", lambda chunk: base.get(store, chunk)),
        ("zc_get", lambda chunk: _zc_get(zc, pool, chunk, fallback)),
    ]
    gc.collect()
    for phase, steps in (("put", put_steps), ("get", get_steps)):
        for k, chunk in enumerate(_chunks(items)):
            shift = k % len(steps)
            for name, body in steps[shift:] + steps[:shift]:
                t0 = clock()
                body(chunk)
                secs[name] += clock() - t0
            if progress is not None:
                progress(f"{phase} (interleaved)", len(chunk) * len(steps))
    ok = True
    if verify:
        # The last write to each handle wins; every store must give that page back.
        last: dict[tuple[Oid, int], bytes] = {(o, i): p for o, i, p in items}
        ok = all(base.decompress(store[key]) == p for key, p in last.items())
        ok = ok and _verify(zc, pool, last, fails[0], fallback)
    result = RunResult(
        dict_put=_rate(n, secs["dict_put"]),
        dict_get=_rate(n, secs["dict_get"]),
        zc_put=_rate(n, secs["zc_put"]),
        zc_get=_rate(n, secs["zc_get"]),
        rejects=fails[0],
        verified=ok,
    )
    return result, zc


#: How density is defined; printed with the table and put in the JSON report.
DENSITY_DEFINITION = (
    "density = original bytes of ALL offered pages / bytes the contender holds for them. "
    "zcache holds its frames used (4096 B each) + its Python metadata + every page it "
    "refused, kept raw by the caller (4096 B each + that fallback dict's bytes); the dict "
    "holds its compressed bytes objects + the dict. Both measured with tracemalloc."
)


def measure_density(
    items: Sequence[Item],
    memory: int,
    compressor: str,
    progress: Progress | None,
    allocator: str = "zsmalloc",
) -> dict[str, Any]:
    """Untimed pass under tracemalloc: bytes each contender holds for ALL offered pages.

    See :data:`DENSITY_DEFINITION`: a page zcache refuses is charged to zcache as a
    raw page the caller keeps (4096 B plus its fallback dict entry), so density
    compares the same page set on both sides. Keys are built inside the traced
    region, as a real caller would hand in fresh tuples, so a store that keeps the
    caller's oid tuple pays for it.
    """
    n = len(items)
    offered = n * PAGE_SIZE
    pages = [p for _o, _i, p in items]
    out: dict[str, Any] = {}

    gc.collect()
    # the arena is mapped before tracing starts
    zc = Zcache(memory=memory, compressor=compressor, allocator=allocator)
    pool = zc.new_pool(persistent=True)
    zc.compressor.compress(pages[0])  # codec contexts allocate their workspace lazily
    refused = bytearray(n)  # allocated before tracing: marking a page allocates nothing
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    put = zc.put
    for start in range(0, n, _CHUNK):
        for i in range(start, min(n, start + _CHUNK)):
            if not put(pool, (i & 0xFF, 0, 0), i >> _SWIZ, pages[i]):
                refused[i] = 1
        if progress is not None:
            progress("density (tracemalloc)", min(_CHUNK, n - start))
    zc_traced = tracemalloc.get_traced_memory()[0] - base
    # The caller's fallback for refused pages, traced on its own. The page objects
    # already exist (not traced), so their 4096 B each are added explicitly below.
    base = tracemalloc.get_traced_memory()[0]
    fallback: dict[tuple[Oid, int], bytes] = {}
    for i in range(n):
        if refused[i]:
            fallback[((i & 0xFF, 0, 0), i >> _SWIZ)] = pages[i]
    fallback_traced = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    stats = zc.stats()
    stored = int(stats.get("stored_pages", 0))
    n_refused = len(fallback)
    frames = zc.frames_total - zc.frames_free
    ram = frames * PAGE_SIZE + zc_traced
    refused_bytes = n_refused * PAGE_SIZE + fallback_traced
    held = ram + refused_bytes
    out["definition"] = DENSITY_DEFINITION
    out["zcache"] = {
        "offered_pages": n,
        "offered_bytes": offered,
        "stored_pages": stored,
        "refused_pages": n_refused,
        "frames_used": frames,
        "metadata_bytes_tracemalloc": zc_traced,
        "metadata_bytes_engine": stats.get("metadata_bytes"),
        "metadata_per_page": zc_traced / stored if stored else 0.0,
        "ram_used": ram,
        "refused_raw_bytes": refused_bytes,
        "held_bytes": held,
        "density": offered / held if held else 0.0,
        "density_zcache_only": stored * PAGE_SIZE / ram if ram else 0.0,
        "metadata_source": "tracemalloc (Python objects allocated by puts; arena excluded)",
    }
    del zc, stats, fallback

    gc.collect()
    compress = baseline_for(compressor).compress
    compress(pages[0])
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    store: dict[tuple[Oid, int], bytes] = {}
    for i in range(n):
        store[((i & 0xFF, 0, 0), i >> _SWIZ)] = compress(pages[i])
    dict_traced = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    payload = sum(len(v) for v in store.values())
    out["dict"] = {
        "offered_pages": n,
        "offered_bytes": offered,
        "stored_pages": len(store),
        "refused_pages": n - len(store),
        "ram_used": dict_traced,
        "held_bytes": dict_traced,
        "compressed_bytes": payload,
        "overhead_per_page": (dict_traced - payload) / len(store) if store else 0.0,
        "density": offered / dict_traced if dict_traced else 0.0,
    }
    del store
    return out


def run_mixed(
    items: Sequence[Item],
    memory: int,
    compressor: str,
    progress: Progress | None,
    clock: Callable[[], float] = time.perf_counter,
    allocator: str = "zsmalloc",
) -> dict[str, Any]:
    """A third persistent, the rest ephemeral, through a budget smaller than the data."""
    zc = Zcache(memory=memory, compressor=compressor, allocator=allocator)
    eph = zc.new_pool(persistent=False)
    pers = zc.new_pool(persistent=True)
    put = zc.put
    get = zc.get
    pers_stored: list[int] = []
    pers_failed = eph_failed = 0
    t0 = clock()
    for start in range(0, len(items), _CHUNK):
        for i in range(start, min(len(items), start + _CHUNK)):
            oid, index, page = items[i]
            if i % 3 == 0:
                if put(pers, oid, index, page):
                    pers_stored.append(i)
                else:
                    pers_failed += 1
            elif not put(eph, oid, index, page):
                eph_failed += 1
        if progress is not None:
            progress("mixed put", min(_CHUNK, len(items) - start))
    put_s = clock() - t0
    stats_after_put = zc.stats()
    eph_hits = eph_misses = wrong = 0
    t0 = clock()
    for start in range(0, len(items), _CHUNK):
        for i in range(start, min(len(items), start + _CHUNK)):
            oid, index, page = items[i]
            if i % 3 == 0:
                continue
            data = get(eph, oid, index)
            if data is None:
                eph_misses += 1
            elif data != page:
                wrong += 1
            else:
                eph_hits += 1
        if progress is not None:
            progress("mixed get", min(_CHUNK, len(items) - start))
    get_s = clock() - t0
    pers_bad = sum(1 for i in pers_stored if get(pers, items[i][0], items[i][1]) != items[i][2])
    keys = (
        "eph_ate_tail",
        "pers_ate_eph",
        "evicted_eph_pageframes",
        "evicted_eph_zpages",
        "compress_poor",
        "mean_compress_poor",
        "failed_eph_puts",
        "failed_pers_puts",
    )
    return {
        "memory": memory,
        "frames_total": zc.frames_total,
        "pages": len(items),
        "put_pages_per_s": _rate(len(items), put_s),
        "eph_get_pages_per_s": _rate(len(items) - len(range(0, len(items), 3)), get_s),
        "pers_stored": len(pers_stored),
        "pers_failed": pers_failed,
        "pers_corrupt": pers_bad,
        "eph_failed_puts": eph_failed,
        "eph_hits": eph_hits,
        "eph_misses": eph_misses,
        "eph_wrong_data": wrong,
        **{k: stats_after_put[k] for k in keys if k in stats_after_put},
    }


@dataclass
class BenchReport:
    """Everything ``tmem bench`` prints (``as_dict`` is the ``--json`` form)."""

    corpus: str
    compressor: str
    pages: int
    unique_pages: int
    repeat: int
    memory: int
    clock: str = "cpu"
    allocator: str = "zsmalloc"
    runs: list[RunResult] = field(default_factory=list)
    density: dict[str, Any] = field(default_factory=dict)
    mixed: dict[str, Any] = field(default_factory=dict)
    zcache_stats: dict[str, int | float] = field(default_factory=dict)

    def _median(self, attr: str) -> float | None:
        values = [getattr(r, attr) for r in self.runs]
        if any(v is None for v in values) or not values:
            return None
        return float(statistics.median(values))

    def _ratio(self, num: str, den: str) -> float | None:
        ratios = [
            getattr(r, num) / getattr(r, den)
            for r in self.runs
            if getattr(r, num) is not None and getattr(r, den)
        ]
        return float(statistics.median(ratios)) if ratios else None

    def as_dict(self) -> dict[str, Any]:
        def us(rate: float | None) -> float | None:
            return 1e6 / rate if rate else None

        zc_put, zc_get = self._median("zc_put"), self._median("zc_get")
        return {
            "corpus": self.corpus,
            "compressor": self.compressor,
            "allocator": self.allocator,
            "pages": self.pages,
            "unique_pages": self.unique_pages,
            "repeat": self.repeat,
            "clock": CLOCK_NAMES[self.clock],
            "engine": engine_kind(),
            "memory": self.memory,
            "put": {
                "zcache_pages_per_s": zc_put,
                "dict_pages_per_s": self._median("dict_put"),
                "ratio": self._ratio("zc_put", "dict_put"),
                "zcache_us_per_page": us(zc_put),
            },
            "get": {
                "zcache_pages_per_s": zc_get,
                "dict_pages_per_s": self._median("dict_get"),
                "ratio": self._ratio("zc_get", "dict_get"),
                "zcache_us_per_page": us(zc_get),
            },
            "same_pages": THROUGHPUT_DEFINITION,
            "rejects": self.runs[0].rejects if self.runs else 0,
            "rejects_poor_compression": int(
                self.zcache_stats.get("compress_poor", 0)
                + self.zcache_stats.get("mean_compress_poor", 0)
            ),
            "rejects_no_memory": int(self.zcache_stats.get("failed_pers_puts", 0)),
            "verified": all(r.verified for r in self.runs),
            "density": self.density,
            "mixed": self.mixed,
            "zcache_stats": self.zcache_stats,
        }


def _enough_memory(pages: Sequence[bytes], count: int, compressor: str) -> int:
    """A budget that holds all ``count`` pages under zbud, without reserving a frame each.

    zbud puts two zpages in a frame when their chunks (64 B, including a 32 B
    handle) add up to at most 64; any two "small" pages (<= 32 chunks) fit
    together, so frames <= big + ceil(small / 2), plus slack. Reserving a frame
    per page instead would map (and prefault) twice the RAM at 10**6 pages.
    """
    compress = get_compressor(compressor).compress
    m = len(pages)
    big = small = 0
    for j, page in enumerate(pages[: min(m, count)]):
        mult = count // m + (1 if j < count % m else 0)
        chunks = (len(compress(page)) + 32 + 63) // 64
        if chunks > 32:
            big += mult
        else:
            small += mult
    frames = big + (small + 1) // 2
    frames = min(count, frames + frames // 50) + 64
    return frames * PAGE_SIZE


def _warm_up(items: Sequence[Item], compressor: str, allocator: str = "zsmalloc") -> None:
    """Run both stores once, untimed, so first-call costs land in neither."""
    store: dict[tuple[Oid, int], bytes] = {}
    base = baseline_for(compressor)
    base.put(store, items)
    base.get(store, items)
    zc = Zcache(memory=(len(items) + 16) * PAGE_SIZE, compressor=compressor, allocator=allocator)
    pool = zc.new_pool(persistent=True)
    fallback: dict[tuple[Oid, int], bytes] = {}
    _zc_put(zc, pool, items, [0], fallback)
    _zc_get(zc, pool, items, fallback)


def run_bench(
    pages: Sequence[bytes],
    *,
    n: int | None = None,
    compressor: str = "lz4",
    memory: int | str | None = None,
    mixed_memory: int | str | None = None,
    repeat: int = 1,
    corpus: str = "",
    progress: Progress | None = None,
    density: bool = True,
    mixed: bool = True,
    clock: str = "cpu",
    batch: int = 256,
    allocator: str = "zsmalloc",
) -> BenchReport:
    """Run all phases; ``n`` pages (default: the corpus once), median of ``repeat`` runs.

    ``clock="cpu"`` times with this thread's CPU time, so time the scheduler gives
    to other processes on a shared machine is charged to nobody; ``"wall"`` uses
    the wall clock. Both contenders always use the same clock. ``batch`` is
    accepted for compatibility and only checked: there is no batch phase, since
    ``put_many``/``get_many`` are loops over ``put``/``get`` (see the module doc).
    """
    if not pages:
        raise ValueError("no pages to replay")
    if batch < 1:
        raise ConfigError(f"batch size must be positive, got {batch}")
    if clock not in CLOCKS:
        raise ConfigError(f"unknown clock {clock!r}; choose from {', '.join(CLOCKS)}")
    timer = CLOCKS[clock]
    get_compressor(compressor)  # fail early on a bad name
    if allocator not in ALLOCATORS:
        raise ConfigError(f"unknown allocator {allocator!r}; choose from {', '.join(ALLOCATORS)}")
    count = len(pages) if n is None else n
    items = make_items(pages, count)
    budget = parse_size(memory) if memory is not None else _enough_memory(pages, count, compressor)
    report = BenchReport(
        corpus=corpus,
        compressor=compressor,
        pages=count,
        unique_pages=len(pages),
        repeat=repeat,
        memory=budget,
        clock=clock,
        allocator=allocator,
    )
    gc.collect()
    gc.freeze()  # the page corpus is immortal: keep it out of every GC pass
    try:
        _warm_up(items[: min(len(items), 2048)], compressor, allocator)
        frames_used = 0
        for r in range(max(1, repeat)):
            result, zc = _one_repeat(
                items,
                budget,
                compressor,
                progress,
                verify=(r == 0),
                clock=timer,
                allocator=allocator,
            )
            report.runs.append(result)
            if r == 0:
                report.zcache_stats = zc.stats()
                frames_used = zc.frames_used
            del zc
        if density:
            report.density = measure_density(items, budget, compressor, progress, allocator)
        if mixed:
            if mixed_memory is not None:
                mbudget = parse_size(mixed_memory)
            else:
                mbudget = max(16, frames_used // 2) * PAGE_SIZE
            report.mixed = run_mixed(
                items, mbudget, compressor, progress, clock=timer, allocator=allocator
            )
    finally:
        gc.unfreeze()
    return report


def phase_sizes(n: int, repeat: int, *, density: bool, mixed: bool) -> int:
    """Total progress steps ``run_bench`` reports, for a progress bar's total."""
    per_repeat = 4 * n
    return max(1, repeat) * per_repeat + (n if density else 0) + (2 * n if mixed else 0)
