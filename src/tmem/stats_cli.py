"""``tmem stats``: zcache, allocator (zsmalloc, zbud) and front-end counters as tables
or JSON.

Without ``--url`` it runs a small embedded workload (frontswap stores and loads,
cleancache puts and gets, through a budget small enough for ouroboros to run) so
the command shows every counter moving on its own. With ``--url`` it fetches the
``/stats`` JSON of a running ``tmem serve`` and prints it the same way.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from tmem.bench_cli import SizeParam
from tmem.compress import COMPRESSORS, PAGE_SIZE
from tmem.corpus import load_pages
from tmem.errors import TmemError
from tmem.frontends import Cleancache, Frontswap, merged_stats
from tmem.sizes import format_size
from tmem.zcache import Zcache

Scalar = int | float | str | bool | None

#: zram-style summary keys (Zcache.stats()), shown in their own group.
SUMMARY_KEYS = (
    "memory_budget",
    "frames_total",
    "frames_used",
    "frames_free",
    "stored_pages",
    "orig_data_size",
    "compr_data_size",
    "metadata_bytes",
    "metadata_bytes_per_page",
    "arena_resident_bytes",
    "mem_used_total",
    "compression_ratio",
)
_BYTE_KEYS = ("_size", "_bytes", "zbytes", "mem_used_total", "memory_budget")
#: most specific prefix first
_PREFIX_GROUPS = (
    ("zbud_", "zbud"),
    ("zs_", "zsmalloc"),
    ("cleancache_", "cleancache"),
    ("frontswap_", "frontswap"),
)
_MAX_RESPONSE = 16 << 20

__all__ = ["SUMMARY_KEYS", "demo_stats", "fetch_stats", "group_stats", "merged_stats", "stats"]


def _flatten(prefix: str, value: Mapping[str, Any], out: dict[str, Scalar]) -> None:
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, Mapping):
            _flatten(f"{name}.", item, out)
        elif isinstance(item, int | float | str | bool) or item is None:
            out[name] = item
        else:
            out[name] = str(item)


def group_stats(stats: Mapping[str, Any]) -> dict[str, dict[str, Scalar]]:
    """Split a stats mapping into display groups: summary, zcache, the allocator's,
    front ends.

    Flat keys are grouped by name (``zbud_*``, ``zs_*``, ``cleancache_*``, ``frontswap_*``,
    the summary keys, everything else under zcache). A server sends sections
    (``{"zcache": {...}, "blockdev": {...}, "server": {...}}``): the zcache section
    is split the same way, any other section becomes a group named by its key.
    """
    groups: dict[str, dict[str, Scalar]] = {"summary": {}, "zcache": {}}
    _group_into(stats, groups)
    if groups["summary"]:
        order = {k: i for i, k in enumerate(SUMMARY_KEYS)}
        groups["summary"] = dict(
            sorted(groups["summary"].items(), key=lambda kv: order.get(kv[0], len(order)))
        )
    return {name: values for name, values in groups.items() if values}


def _group_into(stats: Mapping[str, Any], groups: dict[str, dict[str, Scalar]]) -> None:
    for key, value in stats.items():
        if isinstance(value, Mapping):
            if key == "zcache":
                # A server's zcache section is Zcache.stats(): split it like a flat one.
                _group_into(value, groups)
                continue
            sub: dict[str, Scalar] = {}
            _flatten("", value, sub)
            groups.setdefault(key, {}).update(sub)
            continue
        scalar: Scalar = (
            value if isinstance(value, int | float | str | bool) or value is None else str(value)
        )
        if key in SUMMARY_KEYS:
            groups["summary"][key] = scalar
            continue
        for prefix, group in _PREFIX_GROUPS:
            if key.startswith(prefix):
                groups.setdefault(group, {})[key] = scalar
                break
        else:
            groups["zcache"][key] = scalar


def _human(key: str, value: Scalar) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int | float) and key.endswith(_BYTE_KEYS):
        return format_size(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return ""


def render(stats: Mapping[str, Any], console: Console, title: str) -> None:
    """One table per group; byte counts also shown in human units."""
    for name, values in group_stats(stats).items():
        table = Table(title=f"{title}: {name}", title_justify="left")
        table.add_column("counter")
        table.add_column("value", justify="right")
        table.add_column("", justify="right", style="dim")
        for key, value in values.items():
            if isinstance(value, float):
                shown = f"{value:.4g}"
            elif isinstance(value, int) and not isinstance(value, bool):
                shown = f"{value:,}"
            else:
                shown = str(value)
            table.add_row(key, shown, _human(key, value))
        console.print(table)


def fetch_stats(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET ``<url>/stats`` (or ``url`` itself if it already ends in /stats) as JSON."""
    target = url.rstrip("/")
    if not target.startswith(("http://", "https://")):
        raise click.BadParameter(f"not an http(s) URL: {url!r}", param_hint="--url")
    if not target.endswith("/stats"):
        target += "/stats"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:
            body = response.read(_MAX_RESPONSE + 1)
    except (urllib.error.URLError, OSError) as exc:
        raise click.ClickException(f"cannot fetch {target}: {exc}") from exc
    if len(body) > _MAX_RESPONSE:
        raise click.ClickException(f"{target}: response larger than {_MAX_RESPONSE} bytes")
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise click.ClickException(f"{target}: not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise click.ClickException(f"{target}: expected a JSON object, got {type(data).__name__}")
    return data


def demo_stats(pages: int, memory: int, compressor: str, corpus: str) -> dict[str, int | float]:
    """A small swap + page-cache workload through one Zcache; returns merged counters.

    Two thirds of the pages are swapped out through frontswap and half of those
    swapped back in; the rest go through cleancache, half read back. The budget
    (``memory``) is normally below the data so ephemeral frames get reclaimed.
    """
    source = load_pages(corpus, sample_pages=min(max(pages, 64), 2048))
    zc = Zcache(memory=memory, compressor=compressor)
    fs = Frontswap(zc)
    cc = Cleancache(zc)
    fs.init(0)
    fs_pool = cc.init_fs(PAGE_SIZE)
    n_swap = (pages * 2) // 3
    for off in range(n_swap):
        fs.store(0, off, source[off % len(source)])
    for off in range(0, n_swap, 2):
        fs.load(0, off)
    n_file = pages - n_swap
    for i in range(n_file):
        cc.put_page(fs_pool, 1000 + i // 64, i % 64, source[(n_swap + i) % len(source)])
    for i in range(0, n_file, 2):
        cc.get_page(fs_pool, 1000 + i // 64, i % 64)
    for off in range(1, min(n_swap, 64), 2):
        fs.invalidate_page(0, off)
    return merged_stats(zc, fs, cc)


@click.command()
@click.option("--url", default=None, help="Fetch /stats JSON from a running `tmem serve`.")
@click.option(
    "--pages",
    "-n",
    type=click.IntRange(1, 10_000_000),
    default=3000,
    show_default=True,
    help="Pages in the embedded demo workload (without --url).",
)
@click.option(
    "--memory",
    type=SizeParam(),
    default="4MiB",
    show_default=True,
    help="Demo Zcache budget (64MiB, 1G, ...).",
)
@click.option("--compressor", type=click.Choice(COMPRESSORS), default="lz4", show_default=True)
@click.option("--corpus", default="anon", show_default=True, help="Demo page source (see bench).")
@click.option("--json", "as_json", is_flag=True, help="Print the counters as one JSON object.")
def stats(
    url: str | None, pages: int, memory: int, compressor: str, corpus: str, as_json: bool
) -> None:
    """Print zcache and allocator counters and the zram-style summary (table or --json)."""
    if url is not None:
        data: Mapping[str, Any] = fetch_stats(url)
        title = url
    else:
        try:
            data = demo_stats(pages, memory, compressor, corpus)
        except (TmemError, OSError) as exc:
            raise click.ClickException(str(exc)) from exc
        title = f"demo ({pages} pages, {format_size(memory)}, {compressor})"
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        render(data, Console(), title)
