"""Start real RAMster node processes on 127.0.0.x for the cluster tests and benchmark."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from tmem.ramster.node import ControlClient  # noqa: E402


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_cluster(
    path: Path, hosts: list[str], *, secret: str = "lab-secret-0123456789", **extra: Any
) -> dict[str, tuple[str, int]]:
    """A cluster file with nodes n1..nN on the given addresses and free ports."""
    lines = ["[cluster]", 'name = "lab"', f'secret = "{secret}"']
    for k, v in extra.items():
        lines.append(f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"')
    nodes = {}
    for i, host in enumerate(hosts, start=1):
        port = free_port(host)
        nodes[f"n{i}"] = (host, port)
        lines += [
            "",
            "[[node]]",
            f'name = "n{i}"',
            f"number = {i}",
            f'host = "{host}"',
            f"port = {port}",
        ]
    path.write_text("\n".join(lines) + "\n")
    return nodes


class NodeProc:
    """One `tmem cluster serve` process and its control socket."""

    def __init__(
        self, cluster: Path, name: str, memory: str, workdir: Path, extra: tuple[str, ...] = ()
    ) -> None:
        self.cluster, self.name, self.memory, self.workdir = cluster, name, memory, workdir
        self.extra = extra
        self.control = workdir / f"{name}.ctl"
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, cluster: Path | None = None) -> NodeProc:
        env = dict(os.environ, PYTHONPATH=str(SRC))
        with contextlib_suppress():
            self.control.unlink()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tmem",
                "cluster",
                "serve",
                "--cluster",
                str(cluster or self.cluster),
                "--node",
                self.name,
                "--memory",
                self.memory,
                "--control",
                str(self.control),
                "-v",
                *self.extra,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )
        deadline = time.monotonic() + 20
        while not self.control.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start")
            time.sleep(0.05)
        return self

    def client(self) -> ControlClient:
        return ControlClient(self.control)

    def call(self, op: str, *args: Any) -> Any:
        with self.client() as c:
            return c.call(op, *args)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class contextlib_suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


@contextmanager
def running(nodes: list[NodeProc]) -> Iterator[list[NodeProc]]:
    try:
        for n in nodes:
            n.start()
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def wait_for(pred: Any, timeout: float = 20.0, interval: float = 0.1) -> float:
    """Poll ``pred`` until true; returns the seconds waited (AssertionError on timeout)."""
    t0 = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def peer_state(stats: dict[str, Any], name: str) -> str:
    for p in stats["peers"]:
        if p["node"] == name:
            return str(p["state"])
    raise KeyError(name)
