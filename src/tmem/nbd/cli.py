"""``tmem serve``: build a server from options/TOML, then run it until SIGTERM.

Split in two steps (:func:`config_from_options`, :func:`tmem.nbd.server.run`) so that
other commands (a RAMster cluster node that also serves NBD) reuse the same options
and the same server.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from tmem.errors import TmemError
from tmem.nbd.config import DEFAULT_LISTEN, LOG_LEVELS, ServeConfig, load_config
from tmem.zcache import ALLOCATORS

F = TypeVar("F", bound=Callable[..., Any])

_HELP = """Serve a compressed RAM block device over NBD.

Writes are compressed into a RAM budget (--memory) by zcache; pages that do not
compress, and the oldest pages once RAM is full, spill to --backing PATH if given.
With --compress-behind (the default) a write lands raw in a free frame of the
budget and is compressed when the server is idle, or at once when the frame is
needed: bursts of writes run at memory speed, and density is the same once the
server has caught up. RAM is taken from the OS as pages arrive and given back as
they go (--prefault reserves the whole budget at start instead).
Any NBD client can use it: nbd-client (swap or a filesystem), qemu, nbdcopy, nbdinfo.

The export is VOLATILE, like zram: its contents live only while this server runs.
The backing file is a spill tier, not a persistent disk; restarting the server
starts from an empty (all-zero) device.

Do not serve swap to the same host that runs this server: under memory pressure
the kernel would wait for a process that itself needs memory (deadlock). Use
--mlock on a separate machine.
"""


def serve_options(func: F) -> F:
    """The options of ``tmem serve``; reusable by commands that also serve NBD."""
    options = [
        click.option(
            "--listen",
            "listen",
            multiple=True,
            metavar="HOST:PORT|unix:PATH",
            help=f"Address to listen on (repeatable). Default {DEFAULT_LISTEN}.",
        ),
        click.option(
            "--size",
            metavar="SIZE",
            help="Export size, e.g. 1GiB (multiple of 4 KiB). Default 1GiB.",
        ),
        click.option(
            "--memory", metavar="SIZE", help="RAM budget for compressed pages. Default 256MiB."
        ),
        click.option(
            "--compressor", metavar="NAME", help="lz4 (default), zstd, or lzo (the lzo extra)."
        ),
        click.option(
            "--backing",
            type=click.Path(dir_okay=False),
            metavar="PATH",
            help="Spill file (sparse, emptied on start and exit) or block device for "
            "incompressible and written-back pages.",
        ),
        click.option(
            "--export-name", metavar="NAME", help="Export name (default: the empty name)."
        ),
        click.option(
            "--config",
            "config_file",
            type=click.Path(exists=True, dir_okay=False),
            help="TOML file whose keys are these option names; options override it.",
        ),
        click.option("--stats", metavar="HOST:PORT", help="Serve /metrics and /stats here."),
        click.option(
            "--mlock/--no-mlock",
            default=None,
            help="mlockall and oom_score_adj -1000 (for serving swap to another host).",
        ),
        click.option(
            "--compress-behind/--no-compress-behind",
            default=None,
            help="Store writes raw while the budget has free frames and compress them "
            "when idle (default on); off compresses every write before replying.",
        ),
        click.option(
            "--allocator",
            type=click.Choice(ALLOCATORS, case_sensitive=False),
            help="How compressed pages share frames: zsmalloc (default; densest) or zbud "
            "(at most two pages a frame; simpler, cheaper to reclaim).",
        ),
        click.option(
            "--prefault",
            is_flag=True,
            default=None,
            help="Reserve and touch the whole --memory budget at start instead of taking "
            "RAM as pages arrive and giving it back as they go; the choice for serving "
            "swap with --mlock (which implies it).",
        ),
        click.option(
            "--recompress",
            metavar="CODEC",
            help="Recompress pages not rewritten for --recompress-after with a stronger "
            "codec (e.g. zstd, zstd-3) while clients are quiet. Default off.",
        ),
        click.option(
            "--recompress-after",
            metavar="DURATION",
            help="How long after a page was written --recompress may take it: 30s "
            "(default), 500ms, 2m, 1h, or seconds.",
        ),
        click.option(
            "--log-level",
            type=click.Choice(LOG_LEVELS, case_sensitive=False),
            help="Log verbosity on stderr (default info).",
        ),
        click.option(
            "--ready-file",
            type=click.Path(dir_okay=False),
            help="Write the bound addresses as JSON here once listening.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def config_from_options(config_file: str | None, **options: Any) -> ServeConfig:
    """TOML file then command-line values (None = not given)."""
    return load_config(config_file, {k: v for k, v in options.items() if v not in (None, ())})


@click.command(help=_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@serve_options
@click.option(
    "--cluster",
    "cluster_file",
    type=click.Path(exists=True, dir_okay=False),
    help="RAMster cluster file: run as a cluster node (needs --node).",
)
@click.option("--node", "node_name", help="This node's name in the --cluster file.")
@click.option("--cluster-control", type=click.Path(), help="Unix socket of the node's control API.")
@click.option("--cluster-metrics", metavar="HOST:PORT", help="The node's Prometheus /metrics.")
def serve(
    config_file: str | None,
    cluster_file: str | None,
    node_name: str | None,
    cluster_control: str | None,
    cluster_metrics: str | None,
    **options: Any,
) -> None:
    from tmem.nbd.server import run

    if (cluster_file is None) != (node_name is None):
        raise click.UsageError("--cluster and --node go together")
    if cluster_file is None and (cluster_control or cluster_metrics):
        raise click.UsageError("--cluster-control/--cluster-metrics need --cluster")
    try:
        config = config_from_options(config_file, **options)
    except TmemError as exc:
        raise click.UsageError(str(exc)) from exc
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if cluster_file is not None and node_name is not None:
            # Only here is the cluster layer imported (plain serve never loads it).
            from tmem.ramster.export import serve_cluster_export

            metrics = None
            if cluster_metrics:
                host, _, port = cluster_metrics.rpartition(":")
                if not host or not port.isdigit():
                    raise click.UsageError(
                        f"--cluster-metrics: expected HOST:PORT, got {cluster_metrics!r}"
                    )
                metrics = (host, int(port))
            serve_cluster_export(
                config, cluster_file, node_name, control=cluster_control, metrics=metrics
            )
        else:
            run(config)
    except TmemError as exc:
        raise click.ClickException(str(exc)) from exc
