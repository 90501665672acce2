"""A cluster node's store: allocator, prefault and recompression from the cluster file or
the command line, for `tmem cluster serve` and `tmem serve --cluster` (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ramster_helpers import SRC, NodeProc, running, wait_for, write_cluster
from tmem.ramster.node import ControlClient

OID = (9, 0, 1)
MiB = 1 << 20


def _solo(tmp_path: Path, **keys: Any) -> Path:
    cf = tmp_path / "solo.toml"
    write_cluster(cf, ["127.0.0.1"], replicas=1, **keys)
    return cf


def _store(node: NodeProc, pages: list[bytes]) -> tuple[int, list[int]]:
    """Put ``pages`` into a new persistent pool; the pool and the pages it took (a page
    that compresses poorly is refused, as without --huge-pages it must be)."""
    pool = int(node.call("new_pool", True))
    stored = []
    for i in range(0, len(pages), 128):
        batch = [(OID, j, pages[j]) for j in range(i, min(len(pages), i + 128))]
        ok = node.call("put_many", pool, batch)
        stored += [j for (_o, j, _p), k in zip(batch, ok, strict=True) if k]
    assert len(stored) > len(pages) // 2
    return pool, stored


def _allocator(stats: dict[str, Any]) -> str:
    zs = any(k.startswith("zs_") for k in stats)
    zbud = any(k.startswith("zbud_") for k in stats)
    assert zs != zbud, sorted(stats)
    return "zsmalloc" if zs else "zbud"


@pytest.mark.parametrize(
    ("keys", "options", "allocator", "recompressed"),
    [
        ({"allocator": "zbud", "recompress": "zstd", "recompress_after": "0s"}, (), "zbud", True),
        (
            {"allocator": "zbud", "recompress": "zstd", "recompress_after": "0s"},
            ("--allocator", "zsmalloc", "--recompress", "off"),
            "zsmalloc",
            False,
        ),
        ({}, ("--recompress", "zstd-3", "--recompress-after", "0"), "zsmalloc", True),
    ],
)
def test_cluster_serve_store_from_file_then_options(
    tmp_path: Path,
    anon_pages: list[bytes],
    keys: dict[str, Any],
    options: tuple[str, ...],
    allocator: str,
    recompressed: bool,
) -> None:
    """The cluster file sets every node's store; a node's options win. With no NBD
    export, the node runs the store's idle work itself (here: recompression)."""
    pages = anon_pages[:512]
    node = NodeProc(_solo(tmp_path, **keys), "n1", "8MiB", tmp_path, extra=options)
    with running([node]):
        pool, stored = _store(node, pages)
        if recompressed:
            wait_for(lambda: node.call("stats")["recompressed_pages"] > 50)
        s = node.call("stats")
        assert _allocator(s) == allocator
        assert (s["recompressed_pages"] > 0) is recompressed
        assert s["worker_errors"] == 0
        got = node.call("get_many", pool, [(OID, j) for j in stored])
        assert got == [pages[j] for j in stored]


def test_cluster_serve_rejects_a_bad_codec(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "tmem", "cluster", "serve", "--cluster", str(_solo(tmp_path)),
         "--node", "n1", "--recompress", "gzip"],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(SRC)),
    )  # fmt: skip
    assert res.returncode == 1 and "unknown compressor 'gzip'" in res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "tmem", "cluster", "serve", "--cluster", str(_solo(tmp_path)),
         "--node", "n1", "--recompress-after", "-1s"],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(SRC)),
    )  # fmt: skip
    assert res.returncode == 2 and "must not be negative" in res.stderr


def test_serve_cluster_options_win_over_the_cluster_file(tmp_path: Path) -> None:
    """`tmem serve --cluster`: the cluster file says zbud; the serve options say zsmalloc
    and --prefault, and they win (the whole 8 MiB budget is resident at once)."""
    cf = _solo(tmp_path, allocator="zbud", recompress="zstd")
    ctl, ready = tmp_path / "n1.ctl", tmp_path / "n1.ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tmem", "serve", "--cluster", str(cf), "--node", "n1",
         "--listen", f"unix:{tmp_path / 'n1.sock'}", "--size", "8MiB", "--memory", "8MiB",
         "--allocator", "zsmalloc", "--prefault", "--cluster-control", str(ctl),
         "--ready-file", str(ready)],
        env=dict(os.environ, PYTHONPATH=str(SRC)),
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "n1.log").open("wb"),
    )  # fmt: skip
    try:
        wait_for(lambda: ready.exists() and ctl.exists(), timeout=20)
        with ControlClient(ctl) as c:
            s = c.call("stats")
        assert _allocator(s) == "zsmalloc"
        assert s["arena_resident_bytes"] >= 8 * MiB * 0.95  # prefaulted
        assert s["frames_used"] == 0
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
