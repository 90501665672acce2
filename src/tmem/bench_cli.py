"""``tmem bench``: zcache vs a naive compressed dict on real pages (see tmem.bench)."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tmem.bench import BenchReport, phase_sizes, run_bench
from tmem.compress import COMPRESSORS
from tmem.corpus import describe_source, load_pages
from tmem.errors import TmemError
from tmem.sizes import format_size, parse_size
from tmem.zcache import ALLOCATORS


class SizeParam(click.ParamType):  # type: ignore[type-arg]  # generic only in click >= 8.2
    """A click parameter for human sizes (``64MiB``, ``1G``, ``4096``)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return parse_size(value)
        except TmemError as exc:
            self.fail(str(exc), param, ctx)


class CountParam(click.ParamType):  # type: ignore[type-arg]
    """A page count that accepts ``10000``, ``1e6`` or ``1M`` (decimal)."""

    name = "count"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        factor = 1
        if text and text[-1] in "km":
            factor = 1000 if text[-1] == "k" else 1000**2
            text = text[:-1]
        try:
            number = float(text) * factor
        except ValueError:
            self.fail(f"not a page count: {value!r}", param, ctx)
        if number < 1 or number != int(number):
            self.fail(f"page count must be a positive integer: {value!r}", param, ctx)
        return int(number)


def _fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render(report: BenchReport, console: Console) -> None:
    """Human tables for one bench report; each says what it counts."""
    d = report.as_dict()
    console.print(
        f"[bold]tmem bench[/]  corpus={d['corpus']}  compressor={d['compressor']}  "
        f"allocator={d['allocator']}  "
        f"pages={d['pages']:,} ({d['unique_pages']:,} distinct)  repeat={d['repeat']}  "
        f"budget={format_size(d['memory'])}  clock={d['clock']}  engine={d['engine']}"
    )
    base = f"naive dict+{d['compressor']}"
    t = Table(
        title=f"throughput (pages/s, median; the same {d['pages']:,} pages on both sides)",
        title_justify="left",
    )
    t.add_column("operation")
    t.add_column("zcache (+ raw fallback)", justify="right")
    t.add_column(base, justify="right")
    t.add_column("ratio", justify="right")
    t.add_column("zcache us/page", justify="right")
    for key in ("put", "get"):
        row = d[key]
        rate = row["zcache_pages_per_s"]
        t.add_row(
            key,
            _fmt_rate(rate),
            _fmt_rate(row["dict_pages_per_s"]),
            _fmt_ratio(row["ratio"]),
            "-" if not rate else f"{1e6 / rate:.2f}",
        )
    console.print(t)
    console.print(f"  ({d['same_pages']}; no batch rows: put_many/get_many are loops of put/get)")
    dens = d["density"]
    if dens:
        z, n = dens["zcache"], dens["dict"]
        t2 = Table(title="density (after put-all, all offered pages)", title_justify="left")
        t2.add_column("")
        t2.add_column("zcache (+ raw fallback)", justify="right")
        t2.add_column(base, justify="right")
        t2.add_row("pages offered", f"{z['offered_pages']:,}", f"{n['offered_pages']:,}")
        t2.add_row(
            "original bytes offered",
            format_size(z["offered_bytes"]),
            format_size(n["offered_bytes"]),
        )
        t2.add_row("pages held in the store", f"{z['stored_pages']:,}", f"{n['stored_pages']:,}")
        t2.add_row(
            "pages refused (kept raw by the caller)",
            f"{z['refused_pages']:,}",
            f"{n['refused_pages']:,}",
        )
        t2.add_row(
            "store RAM (data + metadata)", format_size(z["ram_used"]), format_size(n["ram_used"])
        )
        t2.add_row("refused pages, raw", format_size(z["refused_raw_bytes"]), format_size(0))
        t2.add_row("bytes held", format_size(z["held_bytes"]), format_size(n["held_bytes"]))
        t2.add_row("density (offered / held)", f"{z['density']:.3f}", f"{n['density']:.3f}")
        t2.add_row(
            "metadata bytes/stored page (tracemalloc)",
            f"{z['metadata_per_page']:.1f}",
            f"{n['overhead_per_page']:.1f}",
        )
        engine = z.get("metadata_bytes_engine")
        if engine is not None and z["stored_pages"]:
            t2.add_row(
                "metadata bytes/stored page (engine)", f"{engine / z['stored_pages']:.1f}", ""
            )
        t2.add_row("frames used", f"{z['frames_used']:,}", "")
        console.print(t2)
        console.print(f"  ({dens['definition']})")
    console.print(
        f"refused by zcache (put returned False): {d['rejects']:,} "
        f"(poor compression {d['rejects_poor_compression']:,}, "
        f"no memory {d['rejects_no_memory']:,})    "
        f"read-back verified: {'yes' if d['verified'] else '[red]NO[/]'}"
    )
    mixed = d["mixed"]
    if mixed:
        t3 = Table(
            title=f"mixed eph/pers, budget {format_size(mixed['memory'])} (ouroboros; zcache only)",
            title_justify="left",
        )
        t3.add_column("counter")
        t3.add_column("value", justify="right")
        for key, value in mixed.items():
            if key == "memory":
                continue
            t3.add_row(key, f"{value:,.0f}" if isinstance(value, float) else f"{value:,}")
        console.print(t3)


@click.command()
@click.option(
    "--corpus",
    default="anon",
    show_default=True,
    help="anon | file | sample | DIR | FILE. anon/file use ../shared/corpus when present "
    "(TMEM_NO_CORPUS=1 ignores it) and sample this machine otherwise.",
)
@click.option(
    "--compressor",
    type=click.Choice(COMPRESSORS),
    default="lz4",
    show_default=True,
)
@click.option(
    "--allocator",
    type=click.Choice(ALLOCATORS),
    default="zsmalloc",
    show_default=True,
    help="How zcache packs compressed pages into frames (the dict side has none).",
)
@click.option(
    "--memory",
    type=SizeParam(),
    default=None,
    help="Zcache budget for put/get phases (default: room for every page).",
)
@click.option(
    "--mixed-memory",
    type=SizeParam(),
    default=None,
    help="Budget of the mixed eph/pers phase (default: half the frames put-all used).",
)
@click.option(
    "--pages",
    "-n",
    type=CountParam(),
    default=None,
    help="Pages to replay, repeating the corpus (e.g. 10000, 1e6, 1M). Default: corpus once.",
)
@click.option("--repeat", "-r", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--no-density", is_flag=True, help="Skip the tracemalloc density pass.")
@click.option("--no-mixed", is_flag=True, help="Skip the mixed (ouroboros) phase.")
@click.option(
    "--batch",
    type=click.IntRange(1, 1 << 20),
    default=256,
    show_default=True,
    help="Accepted for old command lines; unused: put_many/get_many are loops over "
    "put/get, so there is no batch row.",
)
@click.option(
    "--clock",
    type=click.Choice(["cpu", "wall"]),
    default="cpu",
    show_default=True,
    help="cpu: thread CPU time (robust on a shared machine); wall: elapsed time.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (no progress bar).")
def bench(
    corpus: str,
    compressor: str,
    allocator: str,
    memory: int | None,
    mixed_memory: int | None,
    pages: int | None,
    repeat: int,
    no_density: bool,
    no_mixed: bool,
    batch: int,
    clock: str,
    as_json: bool,
) -> None:
    """Replay real pages through zcache and a naive dict of compressed pages, same run.

    Both sides get the same pages: put/get pages/s and their ratios to the dict,
    density (original bytes of ALL offered pages / bytes held, a page zcache
    refuses counted as kept raw by the caller), refusals and ouroboros evictions.
    """
    try:
        page_list = load_pages(corpus)
    except (TmemError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    n = pages if pages is not None else len(page_list)
    err = Console(stderr=True)
    show_bar = not as_json and sys.stderr.isatty()
    bar = (
        Progress(
            TextColumn("{task.description:<24}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        )
        if show_bar
        else None
    )
    with bar if bar is not None else nullcontext():
        callback = None
        if bar is not None:
            total = phase_sizes(n, repeat, density=not no_density, mixed=not no_mixed)
            task = bar.add_task("bench", total=total)

            def callback(phase: str, done: int) -> None:
                bar.update(task, advance=done, description=phase)

        try:
            report = run_bench(
                page_list,
                n=n,
                compressor=compressor,
                memory=memory,
                mixed_memory=mixed_memory,
                repeat=repeat,
                corpus=f"{corpus} ({describe_source(corpus)})",
                progress=callback,
                density=not no_density,
                mixed=not no_mixed,
                clock=clock,
                batch=batch,
                allocator=allocator,
            )
        except TmemError as exc:
            raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, sort_keys=False))
    else:
        render(report, Console())
