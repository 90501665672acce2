"""`tmem serve --cluster`: a node's NBD export spills to its peers (real nbdcopy, real nodes)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ramster_helpers import SRC, NodeProc, peer_state, wait_for, write_cluster
from tmem.ramster.node import ControlClient

pytestmark = pytest.mark.clients

HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
TIMING = {
    "heartbeat_interval": 0.2,
    "dead_after": 1.5,
    "keepalive": 0.5,
    "idle_timeout": 3.0,
    "request_timeout": 3.0,
    "remotify_interval": 0.2,
}


def _nbdcopy() -> str:
    path = shutil.which("nbdcopy")
    if path is None:
        pytest.skip("nbdcopy not installed")
    return path


def test_nbd_export_of_a_small_node_spills_to_peers_and_survives_kill_9(tmp_path: Path) -> None:
    nbdcopy = _nbdcopy()
    cf = tmp_path / "lab.toml"
    write_cluster(cf, HOSTS, **TIMING)
    peers = [NodeProc(cf, "n2", "16MiB", tmp_path), NodeProc(cf, "n3", "16MiB", tmp_path)]
    sock, ctl, ready = tmp_path / "n1.sock", tmp_path / "n1.ctl", tmp_path / "n1.ready"
    rng = random.Random(3)
    size = 4 << 20  # 4x the node's 1 MiB of RAM
    data = b"".join(rng.randbytes(1536) + bytes(2560) for _ in range(size // 4096))
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(data)
    uri = f"nbd+unix:///?socket={sock}"
    env = dict(os.environ, PYTHONPATH=str(SRC))
    n1 = None
    try:
        for p in peers:
            p.start()
        n1 = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tmem",
                "serve",
                "--cluster",
                str(cf),
                "--node",
                "n1",
                "--listen",
                f"unix:{sock}",
                "--size",
                "8MiB",
                "--memory",
                "1MiB",
                "--cluster-control",
                str(ctl),
                "--ready-file",
                str(ready),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "n1.log").open("wb"),
        )
        wait_for(lambda: ready.exists() and ctl.exists(), timeout=20)

        def stats() -> dict:  # type: ignore[type-arg]
            with ControlClient(ctl) as c:
                return c.call("stats")  # type: ignore[no-any-return]

        wait_for(lambda: stats()["peers_up"] == 2, timeout=20)
        subprocess.run([nbdcopy, str(src), uri], check=True, timeout=120)
        s = stats()
        assert s["pers_pages_remoted"] > 0 and s["writes_failed_nomem"] == 0
        assert s["writes_held"] > 0  # writes waited for room instead of failing
        subprocess.run([nbdcopy, uri, str(out)], check=True, timeout=120)
        got = out.read_bytes()
        assert got[:size] == data  # byte-identical, remote pages included
        assert got[size:] == bytes(len(got) - size)
        s = stats()
        assert s["remote_pers_pages_succ_get"] > 0 and s["worker_errors"] == 0
        # kill -9 one peer: every page still reads back (replicas = 2).
        peers[0].kill9()
        wait_for(lambda: peer_state(stats(), "n2") == "down", timeout=10)
        out.unlink()
        subprocess.run([nbdcopy, uri, str(out)], check=True, timeout=120)
        assert out.read_bytes()[:size] == data
        assert stats()["pers_pages_lost"] == 0
    finally:
        if n1 is not None and n1.poll() is None:
            n1.terminate()
            try:
                n1.wait(10)
            except subprocess.TimeoutExpired:
                n1.kill()
        for p in peers:
            p.stop()
    assert n1 is not None and n1.returncode == 0
