"""``tmem cluster ...``: run a node, edit the cluster file, read a node's counters.

Imported lazily by ``tmem.cli`` only when ``tmem cluster`` is invoked.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import click

from tmem.errors import TmemError
from tmem.sizes import parse_duration
from tmem.zcache import ALLOCATORS

from .config import NodeSpec, edit_nodes, load_config


def _hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


@click.group()
def cluster() -> None:
    """Manage a RAMster cluster of tmem nodes."""


@cluster.command("serve")
@click.option("--cluster", "cluster_file", required=True, type=click.Path(dir_okay=False))
@click.option("--node", "node_name", required=True, help="This node's name in the file.")
@click.option("--listen", default=None, help="HOST:PORT to listen on (default: from the file).")
@click.option("--memory", default="64MiB", show_default=True, help="RAM budget.")
@click.option("--compressor", default="lz4", show_default=True)
@click.option("--huge-pages", is_flag=True, help="Keep incompressible persistent pages raw.")
@click.option(
    "--allocator",
    type=click.Choice(ALLOCATORS, case_sensitive=False),
    default=None,
    help="zsmalloc or zbud (default: the cluster file's allocator key, else zsmalloc).",
)
@click.option(
    "--prefault",
    is_flag=True,
    default=None,
    help="Reserve and touch the whole --memory budget at start (default: the cluster "
    "file's prefault key, else RAM on demand).",
)
@click.option(
    "--recompress",
    metavar="CODEC",
    default=None,
    help="Recompress pages idle for --recompress-after with this codec (e.g. zstd-3; "
    "default: the cluster file's recompress key, else off).",
)
@click.option(
    "--recompress-after",
    metavar="DURATION",
    default=None,
    help="30s (default), 500ms, 2m, 1h, or seconds (default: the cluster file's key).",
)
@click.option("--control", default=None, type=click.Path(), help="Unix socket of the control API.")
@click.option("--metrics", default=None, help="HOST:PORT for a Prometheus /metrics endpoint.")
@click.option(
    "--pid-file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write the PID here (for add-node/remove-node --reload-pid).",
)
@click.option("-v", "--verbose", count=True)
def serve_cmd(
    cluster_file: str,
    node_name: str,
    listen: str | None,
    memory: str,
    compressor: str,
    huge_pages: bool,
    allocator: str | None,
    prefault: bool | None,
    recompress: str | None,
    recompress_after: str | None,
    control: str | None,
    metrics: str | None,
    pid_file: str | None,
    verbose: int,
) -> None:
    """Run one cluster node until SIGTERM (SIGHUP reloads the cluster file)."""
    from .node import serve_node

    try:
        after = parse_duration(recompress_after) if recompress_after is not None else None
    except TmemError as exc:
        raise click.BadParameter(str(exc), param_hint="--recompress-after") from None
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if pid_file is not None:
        Path(pid_file).write_text(f"{os.getpid()}\n")
    try:
        serve_node(
            cluster_file,
            node_name,
            memory=memory,
            compressor=compressor,
            huge_pages=huge_pages,
            allocator=allocator,
            prefault=prefault,
            recompress=recompress,
            recompress_after=after,
            listen=_hostport(listen) if listen else None,
            control=control,
            metrics=_hostport(metrics) if metrics else None,
        )
    except TmemError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot start node {node_name!r}: {exc}") from None
    finally:
        if pid_file is not None:
            Path(pid_file).unlink(missing_ok=True)


@cluster.command("check")
@click.argument("cluster_file", type=click.Path(dir_okay=False))
def check_cmd(cluster_file: str) -> None:
    """Validate a cluster file and list its nodes."""
    try:
        cfg = load_config(cluster_file)
    except TmemError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"cluster {cfg.name}: {len(cfg.nodes)} nodes, replicas={cfg.replicas}, policy={cfg.policy}"
    )
    for n in cfg.nodes:
        click.echo(f"  {n.number:3d} {n.name:16s} {n.host}:{n.port}")


def _signal_pid(pid_file: str | None) -> None:
    if pid_file is None:
        return
    try:
        pid = int(Path(pid_file).read_text().split()[0])
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError, IndexError) as exc:
        raise click.ClickException(f"cannot signal the node in {pid_file}: {exc}") from None
    click.echo(f"sent SIGHUP to {pid}")


@cluster.command("add-node")
@click.argument("cluster_file", type=click.Path(dir_okay=False))
@click.option("--name", required=True)
@click.option("--number", required=True, type=int)
@click.option("--address", required=True, help="HOST:PORT")
@click.option("--reload-pid", default=None, help="PID file of a running node to SIGHUP.")
def add_node_cmd(
    cluster_file: str, name: str, number: int, address: str, reload_pid: str | None
) -> None:
    """Add a node to the cluster file (validated; nothing written if invalid)."""
    host, port = _hostport(address)
    try:
        edit_nodes(cluster_file, add=NodeSpec(name, number, host, port))
    except TmemError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"added node {name} ({number}) at {host}:{port}")
    _signal_pid(reload_pid)


@cluster.command("remove-node")
@click.argument("cluster_file", type=click.Path(dir_okay=False))
@click.option("--name", required=True)
@click.option("--reload-pid", default=None, help="PID file of a running node to SIGHUP.")
def remove_node_cmd(cluster_file: str, name: str, reload_pid: str | None) -> None:
    """Remove a node from the cluster file."""
    try:
        edit_nodes(cluster_file, remove=name)
    except TmemError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"removed node {name}")
    _signal_pid(reload_pid)


@cluster.command("stats")
@click.option("--control", required=True, type=click.Path(), help="Node control socket.")
@click.option("--json", "as_json", is_flag=True)
def stats_cmd(control: str, as_json: bool) -> None:
    """Print a running node's RAMster counters and per-peer state."""
    from .node import ControlClient

    try:
        with ControlClient(control) as c:
            s = c.call("stats")
    except (OSError, TmemError) as exc:
        raise click.ClickException(f"cannot query {control}: {exc}") from None
    if as_json:
        click.echo(json.dumps(s, indent=2, sort_keys=True))
        return
    peers = s.pop("peers", [])
    for k in sorted(s):
        click.echo(f"{k:36s} {s[k]}")
    for p in peers:
        click.echo(
            f"peer {p['node']} ({p['number']}): {p['state']}, "
            f"connected={p.get('connected')}, free={p['free_frames']}"
        )
