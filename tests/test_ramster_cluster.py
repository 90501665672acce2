"""RAMster with real node processes on 127.0.0.1/2/3 (ports chosen at test time)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ramster_helpers import (
    SRC,
    NodeProc,
    free_port,
    peer_state,
    running,
    wait_for,
    write_cluster,
)

HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
TIMING = {
    "heartbeat_interval": 0.2,
    "dead_after": 1.5,
    "keepalive": 0.5,
    "idle_timeout": 3.0,
    "request_timeout": 3.0,
    "remotify_interval": 0.2,
}
OID = (7, 0, 1)


def _pages(n: int, seed: int) -> list[bytes]:
    """Pages that compress to ~1.5 KiB, so zbud packs two per frame (like real anon pages)."""
    rng = random.Random(seed)
    return [rng.randbytes(1536) + bytes(2560) for _ in range(n)]


def _cluster(tmp_path: Path, small: str = "1MiB", big: str = "16MiB") -> list[NodeProc]:
    cf = tmp_path / "lab.toml"
    write_cluster(cf, HOSTS, **TIMING)
    return [
        NodeProc(cf, "n1", small, tmp_path),
        NodeProc(cf, "n2", big, tmp_path),
        NodeProc(cf, "n3", big, tmp_path),
    ]


def _down_since(stats: dict[str, Any], name: str) -> float:
    """When the node declared peer ``name`` down (its time.monotonic clock)."""
    for p in stats["peers"]:
        if p["node"] == name:
            return float(p["down_since"])
    raise KeyError(name)


def _all_up(nodes: list[NodeProc]) -> bool:
    return all(n.call("stats")["peers_up"] == len(nodes) - 1 for n in nodes)


def test_small_node_stores_4x_its_budget_across_the_cluster(tmp_path: Path) -> None:
    nodes = _cluster(tmp_path)
    with running(nodes):
        wait_for(lambda: _all_up(nodes))
        n1, n2, n3 = nodes
        budget_pages = n1.call("stats")["frames_total"]  # 256 frames of 4 KiB = 1 MiB
        pages = _pages(4 * budget_pages, seed=1)
        with n1.client() as c:
            pool = c.call("new_pool", True)
            for i in range(0, len(pages), 64):
                batch = [(OID, j, pages[j]) for j in range(i, min(i + 64, len(pages)))]
                assert all(c.call("put_many", pool, batch)), "a write failed while peers had room"
            s1 = c.call("stats")
            assert s1["pers_pages_remoted"] >= 2 * budget_pages  # most of it is remote now
            assert s1["writes_failed_nomem"] == 0
            # every page is held once: in local RAM (zombies included) or on the peers
            assert s1["pers_zpages"] + s1["remote_pers_pages"] == len(pages)
            remote_before = s1["remote_pers_pages"]
            got = c.call("get_many", pool, [(OID, j) for j in range(len(pages))])
            assert [g == p for g, p in zip(got, pages, strict=True)].count(False) == 0
            s1 = c.call("stats")
            remote = s1["remote_pers_pages"]
            # each page that was remote came back from a peer (a get leaves it there)
            assert remote > 0 and s1["remote_pers_pages_succ_get"] >= remote_before
            # replicas = 2: every remote page has a copy on n2 AND on n3.
            f2, f3 = n2.call("stats"), n3.call("stats")
            assert f2["foreign_pers_pages"] == f3["foreign_pers_pages"] == remote
            assert s1["pers_pages_under_replicated"] == 0
            # Flush every other page; the flushes must reach both peers.
            flushed = c.call("flush_many", pool, [(OID, j) for j in range(0, len(pages), 2)])
            assert flushed == len(pages) // 2
            c.call("sync")
            s1 = c.call("stats")
            assert s1["remote_pages_flushed"] > 0
            wait_for(
                lambda: (
                    n2.call("stats")["foreign_pers_pages"]
                    == n3.call("stats")["foreign_pers_pages"]
                    == c.call("stats")["remote_pers_pages"]
                )
            )
            got = c.call("get_many", pool, [(OID, j) for j in range(len(pages))])
            for j, g in enumerate(got):
                assert g == (None if j % 2 == 0 else pages[j]), j
            # An exclusive get removes the page everywhere (get-and-free).
            odd = [(OID, j) for j in range(1, len(pages), 2)]
            got = c.call("get_many", pool, odd, True)
            assert got == [pages[j] for j in range(1, len(pages), 2)]
            assert c.call("get_many", pool, odd[:5]) == [None] * 5
            c.call("sync")
            s1 = c.call("stats")
            assert s1["remote_pers_pages"] == 0
            wait_for(
                lambda: (
                    n2.call("stats")["foreign_pers_pages"] == 0
                    and n3.call("stats")["foreign_pers_pages"] == 0
                )
            )
        assert all(n.call("stats")["worker_errors"] == 0 for n in nodes)


def _writer(
    node: NodeProc,
    pool: int,
    pages: list[bytes],
    written: list[int],
    stop: threading.Event,
    errors: list[str],
) -> None:
    try:
        with node.client() as c:
            for i in range(0, len(pages), 32):
                if stop.is_set():
                    break
                batch = [(OID, j, pages[j]) for j in range(i, min(i + 32, len(pages)))]
                ok = c.call("put_many", pool, batch)
                written.extend(j for (_o, j, _p), k in zip(batch, ok, strict=True) if k)
                if not all(ok):
                    errors.append(f"{node.name}: put failed at {i}")
    except Exception as exc:  # surfaced by the test
        errors.append(f"{node.name}: {exc!r}")


def _reader(
    node: NodeProc,
    pool: int,
    pages: list[bytes],
    written: list[int],
    stop: threading.Event,
    errors: list[str],
    reads: list[int],
) -> None:
    """Keep reading back pages already written (remote ones included) until stopped."""
    rng = random.Random(5)
    try:
        with node.client() as c:
            while not stop.is_set():
                done = list(written)
                if not done:
                    time.sleep(0.01)
                    continue
                sample = [rng.choice(done) for _ in range(16)]
                got = c.call("get_many", pool, [(OID, j) for j in sample])
                bad = [j for j, g in zip(sample, got, strict=True) if g != pages[j]]
                if bad:
                    errors.append(f"{node.name}: read back wrong/missing pages {bad[:5]}")
                    return
                reads.append(len(sample))
    except Exception as exc:
        errors.append(f"{node.name} reader: {exc!r}")


@pytest.mark.slow
def test_kill_9_one_node_under_load_loses_no_persistent_page(tmp_path: Path) -> None:
    nodes = _cluster(tmp_path, small="1MiB", big="8MiB")
    with running(nodes):
        n1, n2, n3 = nodes
        wait_for(lambda: _all_up(nodes))
        pages1, pages3 = _pages(1024, seed=11), _pages(1024, seed=33)
        pool1, pool3 = n1.call("new_pool", True), n3.call("new_pool", True)
        w1: list[int] = []
        w3: list[int] = []
        errors: list[str] = []
        stop = threading.Event()
        reads: list[int] = []
        threads = [
            threading.Thread(target=_writer, args=(n1, pool1, pages1, w1, stop, errors)),
            threading.Thread(target=_writer, args=(n3, pool3, pages3, w3, stop, errors)),
        ]
        reader = threading.Thread(target=_reader, args=(n1, pool1, pages1, w1, stop, errors, reads))
        for t in [*threads, reader]:
            t.start()
        wait_for(lambda: len(w1) > 400, timeout=120, interval=0.01)
        killed_at = time.monotonic()
        n2.kill9()
        # Wait generously (a loaded CI machine may answer stats late), but time the
        # detection by the node's own record of when it declared n2 down: time.monotonic
        # is one clock for every process of the host, so polling delays do not count.
        wait_for(lambda: peer_state(n1.call("stats"), "n2") == "down", timeout=60, interval=0.05)
        declared = _down_since(n1.call("stats"), "n2") - killed_at
        for t in threads:
            t.join(300)
        # the reader runs on after the writers finished: more rounds of 16 checked reads
        after = len(reads)
        wait_for(lambda: len(reads) >= after + 5 or bool(errors), timeout=60, interval=0.01)
        stop.set()
        reader.join(60)
        assert not errors, errors
        assert len(reads) >= after + 5
        down_after = time.monotonic() - killed_at
        assert 0 < declared <= TIMING["dead_after"] + 1.5
        wait_for(lambda: peer_state(n3.call("stats"), "n2") == "down", timeout=60)
        for node, pool, pages, written in ((n1, pool1, pages1, w1), (n3, pool3, pages3, w3)):
            assert len(written) == len(pages)
            got = node.call("get_many", pool, [(OID, j) for j in written])
            lost = sum(g != pages[j] for g, j in zip(got, written, strict=True))
            s = node.call("stats")
            print(
                f"{node.name}: written={len(written)} verified={len(written) - lost} "
                f"lost={lost} remote={s['remote_pers_pages']} "
                f"under_replicated={s['pers_pages_under_replicated']}"
            )
            assert lost == 0
            assert s["pers_pages_lost"] == 0
        print(
            f"n2 declared down {declared:.2f}s after kill -9 (checked {down_after:.2f}s); "
            f"{sum(reads)} concurrent reads verified on n1"
        )
        # n2 comes back (new incarnation) and rejoins; under-replicated pages get
        # their second copy again.
        n2.start()
        wait_for(lambda: _all_up(nodes), timeout=60)
        for node in (n1, n3):
            wait_for(
                lambda node=node: node.call("stats")["pers_pages_under_replicated"] == 0,
                timeout=120,
                interval=0.2,
            )
        s1 = n1.call("stats")
        assert s1["pers_pages_rereplicated"] > 0
        got = n1.call("get_many", pool1, [(OID, j) for j in w1])
        assert all(g == pages1[j] for g, j in zip(got, w1, strict=True))
        assert all(n.call("stats")["worker_errors"] == 0 for n in nodes)


def test_node_with_wrong_secret_cannot_join(tmp_path: Path) -> None:
    cf = tmp_path / "lab.toml"
    addrs = write_cluster(cf, [*HOSTS[:2], "127.0.0.3"], replicas=1, **TIMING)
    bad = tmp_path / "bad.toml"
    bad.write_text(cf.read_text().replace("lab-secret-0123456789", "not-the-secret-000"))
    mport = free_port("127.0.0.1")
    good = [
        NodeProc(cf, "n1", "4MiB", tmp_path, extra=("--metrics", f"127.0.0.1:{mport}")),
        NodeProc(cf, "n2", "4MiB", tmp_path),
    ]
    intruder = NodeProc(cf, "n3", "4MiB", tmp_path)
    with running(good):
        wait_for(lambda: all(n.call("stats")["peers_up"] == 1 for n in good))
        intruder.start(cluster=bad)
        try:
            wait_for(
                lambda: (
                    good[0].call("stats")["handshake_failures"] >= 2
                    and good[1].call("stats")["handshake_failures"] >= 1
                ),
                timeout=15,
            )
            # the intruder dials again and is refused again; only then look at the state
            refused = good[0].call("stats")["handshake_failures"]
            wait_for(lambda: good[0].call("stats")["handshake_failures"] > refused, timeout=15)
            for n in good:
                s = n.call("stats")
                assert peer_state(s, "n3") == "unknown"
                assert s["peers_up"] == 1
            assert intruder.call("stats")["peers_up"] == 0
            s = good[0].call("stats")
            assert s["peers_connected"] == 1
            # The same counters on /metrics.
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
                text = r.read().decode()
            assert "tmem_ramster_handshake_failures" in text
            assert 'tmem_ramster_peer_up{peer="n2"} 1.0' in text
            assert 'tmem_ramster_peer_up{peer="n3"} 0.0' in text
            assert "tmem_ramster_pers_pages_remoted" in text
            # ...and as /stats JSON, which `tmem stats --url` prints.
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/stats", timeout=5) as r:
                sections = json.loads(r.read())
            assert sections["ramster"]["handshake_failures"] >= 2
            assert sections["peers"]["n2"]["state"] == "up"
            assert "pers_zpages" in sections["zcache"]
            shown = subprocess.run(
                [sys.executable, "-m", "tmem", "stats", "--url", f"http://127.0.0.1:{mport}"],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
                timeout=60,
                check=True,
            ).stdout
            assert "handshake_failures" in shown and "n2" in shown
        finally:
            intruder.stop()
    assert addrs["n3"][0] == "127.0.0.3"


def test_nodes_join_and_leave_a_running_cluster_on_reload(tmp_path: Path) -> None:
    cf = tmp_path / "lab.toml"
    write_cluster(cf, HOSTS[:2], replicas=1, **TIMING)
    pid1 = tmp_path / "n1.pid"
    nodes = [
        NodeProc(cf, "n1", "4MiB", tmp_path, extra=("--pid-file", str(pid1))),
        NodeProc(cf, "n2", "4MiB", tmp_path),
    ]
    n3 = NodeProc(cf, "n3", "4MiB", tmp_path)
    env = dict(os.environ, PYTHONPATH=str(SRC))
    tmem = [sys.executable, "-m", "tmem", "cluster"]
    with running(nodes):
        wait_for(lambda: _all_up(nodes))
        port = free_port("127.0.0.3")
        subprocess.run(
            [
                *tmem,
                "add-node",
                str(cf),
                "--name",
                "n3",
                "--number",
                "3",
                "--address",
                f"127.0.0.3:{port}",
                "--reload-pid",
                str(pid1),
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        assert nodes[1].proc is not None
        nodes[1].proc.send_signal(signal.SIGHUP)  # n1 was signalled through its PID file
        n3.start()
        try:
            wait_for(lambda: _all_up([*nodes, n3]), timeout=15)
            subprocess.run(
                [*tmem, "remove-node", str(cf), "--name", "n3"],
                env=env,
                check=True,
                capture_output=True,
            )
            for n in nodes:
                assert n.proc is not None
                n.proc.send_signal(signal.SIGHUP)
            wait_for(
                lambda: all(
                    n.call("stats")["peers_configured"] == 1 and n.call("stats")["peers_up"] == 1
                    for n in nodes
                ),
                timeout=10,
            )
            assert all(p["node"] != "n3" for p in nodes[0].call("stats")["peers"])
            out = subprocess.run(
                [*tmem, "stats", "--control", str(nodes[0].control), "--json"],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            js = json.loads(out.stdout)
            assert js["node"] == "n1" and js["peers_up"] == 1
            assert {p["node"]: p["state"] for p in js["peers"]} == {"n2": "up"}
        finally:
            n3.stop()


def test_control_api_refuses_bad_requests_and_keeps_serving(tmp_path: Path) -> None:
    import socket
    import struct

    import msgpack

    cf = tmp_path / "solo.toml"
    write_cluster(cf, HOSTS[:1], replicas=1, **TIMING)
    node = NodeProc(cf, "n1", "1MiB", tmp_path)
    with running([node]):

        def raw(payload: bytes, length: int | None = None) -> object:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(node.control))
                n = len(payload) if length is None else length
                s.sendall(struct.pack(">I", n) + payload)
                hdr = s.recv(4)
                if len(hdr) < 4:
                    return None
                (m,) = struct.unpack(">I", hdr)
                body = b""
                while len(body) < m:
                    chunk = s.recv(m - len(body))
                    if not chunk:
                        break
                    body += chunk
                return msgpack.unpackb(body, raw=False)

        def pack(obj: object) -> bytes:
            return bytes(msgpack.packb(obj, use_bin_type=True))

        with node.client() as c:
            pool = c.call("new_pool", True)
        assert raw(b"\xc1\xc1\xc1")[0] == "err"  # type: ignore[index]
        assert raw(pack({"op": 1}))[0] == "err"  # type: ignore[index]
        assert raw(pack(["no_such_op"]))[0] == "err"  # type: ignore[index]
        assert raw(pack(["get_many", pool, [[[1, 2], 0]]]))[0] == "err"  # type: ignore[index]
        assert raw(pack(["get_many", pool, [[[1, 2, -3], 0]]]))[0] == "err"  # type: ignore[index]
        assert raw(pack(["get_many", 99, [[[1, 2, 3], 0]]]))[0] == "err"  # type: ignore[index]
        assert raw(pack(["put_many", pool, [[[1, 2, 3], 0, b"short"]]]))[0] == "err"  # type: ignore[index]
        reply = raw(b"", length=0xFFFFFFFF)  # oversized: refused before buffering
        assert reply is None or reply[0] == "err"  # type: ignore[index]
        with node.client() as c:
            page = bytes(range(256)) * 16
            assert c.call("put_many", pool, [((1, 2, 3), 0, page)]) == [True]
            assert c.call("get_many", pool, [((1, 2, 3), 0)]) == [page]
        assert node.proc is not None and node.proc.poll() is None
