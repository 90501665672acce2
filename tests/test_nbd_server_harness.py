"""Helpers for the NBD tests: start a real `tmem serve` process, make real-data images.

No tests here; the other test_nbd_server*/test_nbd_clients* modules import it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tmem.corpus import write_real_image

SRC = Path(__file__).resolve().parents[1] / "src"
PAGE = 4096


def need(*tools: str) -> None:
    """Skip only when a client tool is genuinely missing (CI installs them)."""
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt-get install libnbd-bin qemu-utils)")


def need_libnbd_python() -> None:
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no /usr/bin/python3")
    probe = subprocess.run(["/usr/bin/python3", "-c", "import nbd"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("python3-libnbd not installed")


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    tcp: str  # host:port
    unix: str  # socket path
    stats_url: str | None
    log: Path

    @property
    def uri(self) -> str:
        return f"nbd://{self.tcp}"

    @property
    def unix_uri(self) -> str:
        return f"nbd+unix:///?socket={self.unix}"

    def stats(self) -> dict[str, Any]:
        assert self.stats_url is not None
        with urllib.request.urlopen(self.stats_url + "/stats", timeout=10) as r:
            data: dict[str, Any] = json.load(r)
        return data

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def start_server(
    tmp: Path, *args: str, stats: bool = True, timeout: float = 30, loop: str | None = None
) -> Served:
    """Run `python -m tmem serve` on an ephemeral port + a unix socket; wait until ready.

    ``loop`` None: the loop TMEM_EVENT_LOOP names (uvloop if unset), so the whole suite
    can run once per event loop (``TMEM_EVENT_LOOP=asyncio pytest``)."""
    loop = loop or os.environ.get("TMEM_EVENT_LOOP", "auto")
    ready = tmp / f"ready-{time.monotonic_ns()}.json"
    sock = tmp / f"nbd-{time.monotonic_ns()}.sock"
    log = tmp / f"serve-{time.monotonic_ns()}.log"
    cmd = [
        sys.executable, "-m", "tmem", "serve",
        "--listen", "127.0.0.1:0", "--listen", f"unix:{sock}",
        "--ready-file", str(ready), "--log-level", "info", *args,
    ]  # fmt: skip
    if stats:
        cmd += ["--stats", "127.0.0.1:0"]
    env = dict(os.environ, PYTHONPATH=str(SRC), TMEM_EVENT_LOOP=loop)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"tmem serve exited {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"tmem serve not ready:\n{log.read_text()}")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    tcp = next(a for a in info["listen"] if not a.startswith("unix:"))
    return Served(proc, tcp, str(sock), info.get("stats"), log)


def serve_factory(tmp_path: Path) -> Iterator[Any]:
    """Body of the ``serve`` fixtures: ``serve("--size", "64MiB")`` starts a server;
    every server is killed at teardown if a test did not stop it."""
    started: list[Served] = []

    def factory(*args: str, stats: bool = True, loop: str | None = None) -> Served:
        s = start_server(tmp_path, *args, stats=stats, loop=loop)
        started.append(s)
        return s

    yield factory
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


real_data_image = write_real_image  # the image the client tests copy in and out


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res
