"""`tmem serve` as a process: --help, config errors, TOML config, stats over HTTP, --mlock."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_nbd_server_harness import SRC, Served, serve_factory

ENV = dict(os.environ, PYTHONPATH=str(SRC))
MiB = 1 << 20


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    yield from serve_factory(tmp_path)


def tmem(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tmem", *args], capture_output=True, text=True, env=ENV, timeout=60
    )


def test_help_says_volatile_and_lists_options() -> None:
    res = tmem("serve", "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    assert "VOLATILE" in text and "not a persistent disk" in text
    for opt in ("--listen", "--size", "--memory", "--compressor", "--backing", "--export-name",
                "--config", "--stats", "--mlock", "--log-level",
                "--no-compress-behind", "--allocator", "--prefault", "--recompress",
                "--recompress-after"):  # fmt: skip
        assert opt in text


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--size", "12345"], "multiple of 4 KiB"),
        (["--compressor", "gzip"], "unknown compressor"),
        (["--listen", "nowhere"], "HOST:PORT"),
        (["--memory", "lots"], "not a size"),
        (["--allocator", "slab"], "'slab' is not one of 'zsmalloc', 'zbud'"),
        (["--recompress", "gzip"], "unknown compressor 'gzip'"),
        (["--recompress", "zstd", "--recompress-after", "-2s"], "must not be negative"),
        (["--recompress-after", "soon"], "not a duration"),
    ],
)
def test_bad_options_fail_fast(args: list[str], msg: str) -> None:
    res = tmem("serve", *args)
    assert res.returncode == 2
    assert msg in res.stderr


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = tmem("serve", "--listen", f"127.0.0.1:{port}", "--size", "1MiB")
    assert res.returncode == 1
    assert "cannot listen" in res.stderr


def test_config_file_and_cli_override(serve: Any, tmp_path: Path) -> None:
    cfg = tmp_path / "serve.toml"
    cfg.write_text(
        'size = "8MiB"\nmemory = "2MiB"\nexport-name = "fromfile"\ncompressor = "zstd"\n'
    )
    s: Served = serve("--config", str(cfg), "--export-name", "fromcli")
    st = s.stats()
    assert st["blockdev"]["blockdev_size_bytes"] == 8 << 20
    assert st["zcache"]["frames_total"] == 512
    if subprocess.run(["which", "nbdinfo"], capture_output=True).returncode == 0:
        out = subprocess.run(
            ["nbdinfo", "--size", f"nbd://{s.tcp}/fromcli"], capture_output=True, text=True
        )
        assert out.stdout.strip() == str(8 << 20)
    assert s.stop() == 0


def test_metrics_and_stats_endpoints(serve: Any) -> None:
    s: Served = serve("--size", "8MiB", "--memory", "2MiB")
    # one real write through the raw protocol so counters move
    from test_nbd_server_badinput import WRITE, RawClient

    c = RawClient(s)
    c.handshake()
    c.request(WRITE, 1, 0, 8192, b"metrics " * 1024)
    assert c.reply() == (0, 1, b"")
    c.close()
    st = s.stats()
    assert st["blockdev"]["blockdev_write_bytes"] == 8192
    assert st["blockdev"]["blockdev_ram_stores"] == 2
    assert st["server"]["server_requests"] == 1
    assert st["zcache"]["frames_total"] == 512
    assert s.stats_url is not None
    with urllib.request.urlopen(s.stats_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/plain")
    assert "tmem_blockdev_write_bytes_total 8192.0" in text
    assert "tmem_blockdev_ram_stores_total 2.0" in text
    assert "tmem_server_connections " in text
    # the whole exposition parses, with the real zcache's counters in it
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["tmem_blockdev_write_bytes"].type == "counter"
    assert families["tmem_blockdev_ram_pages"].type == "gauge"
    assert any(name.startswith("tmem_zcache_") for name in families)
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(s.stats_url + "/nope", timeout=10)
    assert exc.value.code == 404
    assert s.stop() == 0


def test_stale_unix_socket_is_replaced(serve: Any, tmp_path: Path) -> None:
    first: Served = serve("--size", "1MiB", stats=False)
    path = first.unix
    first.proc.kill()  # leaves the socket file behind
    first.proc.wait()
    assert Path(path).exists()
    res = subprocess.Popen(
        [sys.executable, "-m", "tmem", "serve", "--listen", f"unix:{path}", "--size", "1MiB"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert res.stdout is not None
        assert "ready" in res.stdout.readline()
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(path)
            assert c.recv(8) == b"NBDMAGIC"
    finally:
        res.terminate()
        assert res.wait(timeout=30) == 0
    assert not Path(path).exists()  # removed on a clean exit


@pytest.mark.skipif(os.geteuid() != 0, reason="mlockall of a whole process needs root here")
def test_mlock_and_oom_score_adj(serve: Any) -> None:
    s: Served = serve("--size", "4MiB", "--memory", "1MiB", "--mlock", stats=False)
    status = Path(f"/proc/{s.proc.pid}/status").read_text()
    locked_kb = int(next(ln for ln in status.splitlines() if ln.startswith("VmLck")).split()[1])
    assert locked_kb > 1024
    # an mlocked arena cannot give frames back, so the budget is reserved up front
    assert "--mlock implies --prefault" in s.log.read_text()
    can_lower = (
        subprocess.run(
            ["sh", "-c", "echo -1 > /proc/self/oom_score_adj"], capture_output=True
        ).returncode
        == 0
    )
    adj = Path(f"/proc/{s.proc.pid}/oom_score_adj").read_text().strip()
    if can_lower:
        assert adj == "-1000"
    else:  # no CAP_SYS_RESOURCE (a container): the server says so and runs on
        assert "cannot set oom_score_adj -1000" in s.log.read_text()
    assert s.stop() == 0


def _wait_for(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _write(s: Served, pages: list[bytes]) -> None:
    """Write ``pages`` at offset 0 through NBD, in 1 MiB requests."""
    from test_nbd_server_badinput import WRITE, RawClient

    blob = b"".join(pages)
    c = RawClient(s)
    c.handshake()
    for n, pos in enumerate(range(0, len(blob), MiB)):
        chunk = blob[pos : pos + MiB]
        c.request(WRITE, n, pos, len(chunk), chunk)
        assert c.reply() == (0, n, b"")
    c.close()


def _read_back(s: Served, pages: list[bytes]) -> None:
    """Read ``pages`` back from offset 0 through NBD and compare, byte for byte."""
    from test_nbd_server_badinput import READ, RawClient

    blob = b"".join(pages)
    c = RawClient(s)
    c.handshake()
    for n, pos in enumerate(range(0, len(blob), MiB)):
        length = min(MiB, len(blob) - pos)
        c.request(READ, n, pos, length)
        assert c.reply(length) == (0, n, blob[pos : pos + length])
    c.close()


@pytest.mark.parametrize(
    ("options", "toml", "prefix", "recompressed"),
    [
        (["--recompress", "zstd", "--recompress-after", "0"], "", "zs_", True),
        ([], 'allocator = "zbud"\nrecompress = "zstd-3"\nrecompress_after = "0s"\n', "zbud_", True),
        (["--allocator", "zbud", "--recompress", "zstd", "--recompress-after", "1h"], "", "zbud_",
         False),
        ([], "", "zs_", False),
    ],
)  # fmt: skip
def test_store_options_reach_the_store_and_idle_work_runs(
    serve: Any,
    tmp_path: Path,
    anon_pages: list[bytes],
    options: list[str],
    toml: str,
    prefix: str,
    recompressed: bool,
) -> None:
    """Writes land raw (compress-behind); the idle task compresses them and, with
    --recompress, moves pages older than --recompress-after to the strong codec."""
    if toml:
        cfg = tmp_path / "serve.toml"
        cfg.write_text(toml)
        options = [*options, "--config", str(cfg)]
    s: Served = serve("--size", "16MiB", "--memory", "16MiB", *options)
    _write(s, anon_pages[:1024])
    _read_back(s, anon_pages[:1024])  # staged (raw) pages read back as written
    _wait_for(lambda: s.stats()["zcache"]["staged_pages"] == 0)
    if recompressed:
        _wait_for(lambda: s.stats()["zcache"]["recompressed_pages"] > 100)
    else:
        time.sleep(1.5)  # a poll of the idle task or more: still nothing recompressed
    st = s.stats()
    z = st["zcache"]
    assert z["compacted_pages"] > 0
    assert any(k.startswith(prefix) for k in z), sorted(z)
    assert (z["recompressed_pages"] > 0) is recompressed
    assert z["recompress_saved_bytes"] >= 32 * z["recompressed_pages"]
    assert st["server"]["server_idle_work_steps"] > 0
    assert st["server"]["server_idle_work_errors"] == 0
    _read_back(s, anon_pages[:1024])  # compressed and recompressed pages too
    assert s.stop() == 0


def test_live_unix_socket_is_not_stolen(serve: Any) -> None:
    first: Served = serve("--size", "1MiB", stats=False)
    res = tmem("serve", "--listen", f"unix:{first.unix}", "--size", "1MiB")
    assert res.returncode == 1
    assert "in use by a running server" in res.stderr
    with socket.socket(socket.AF_UNIX) as c:  # the first server still owns it
        c.connect(first.unix)
        assert c.recv(8) == b"NBDMAGIC"
    assert first.stop() == 0
