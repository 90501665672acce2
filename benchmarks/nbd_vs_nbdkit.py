"""`tmem serve` against `nbdkit memory` (the baseline), same clients, same run.

Equal work: both servers hold the same real-data image (files from /usr), and tmem's
RAM budget (``--memory``, default 75% of ``--size``) must be SMALLER than the image's
raw size, so tmem really has to compress to hold it. nbdkit memory (started in the
same run) keeps every byte raw, sparse.

Measures, for nbdkit, `tmem serve` as configured by default (compress-behind: writes
land raw in free RAM frames and are compressed in the background) and `tmem serve
--no-compress-behind` (every write compressed before the reply):
  * nbdcopy of the image into the export and back out (MB/s, best of --repeat), with
    --connections. For tmem, a write counts until the server has compressed
    everything: after nbdcopy returns, /stats is polled until staged_pages == 0, and
    that wait is part of the write time and the server CPU of the write. (The MB/s at
    nbdcopy's return is shown too, labelled "acked".) Reads come after that, so they
    always decompress;
  * each server's CPU time per 4 KiB page or request (from /proc/PID/stat, all
    threads): on a loaded machine throughput ratios move with the load, the CPU cost
    per page much less;
  * each server's resident memory after the write (VmRSS) and image bytes / RSS;
  * 4 KiB writes of the image's real pages at depth 32 via libnbd (nbd_aio_writes.py,
    where the system python3 has libnbd), timed to the same "compressed everything"
    point; and `qemu-img bench` 4 KiB reads at depth 32 of real pages (run before the
    fill-pattern writes, which would otherwise be read back). `qemu-img bench -w` writes
    ONE fill pattern, which tmem stores as a pattern without compressing: it is shown,
    labelled as such, and is not the write figure;
and for tmem alone a writeback run: an image of 4x the RAM budget written with a
backing file (pages/s that landed in RAM while writeback ran, writeback pages, and
whether any write failed), then read back and compared.

Not a timed test; run it by hand:

    python3 benchmarks/nbd_vs_nbdkit.py [--size 256MiB] [--memory 75%] [--connections 4]
        [--repeat 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
# The installed tmem (compiled, as users run it) when there is one, else the tree's.
INSTALLED = importlib.util.find_spec("tmem") is not None
if not INSTALLED:
    sys.path.insert(0, str(SRC))

from tmem.corpus import sha256_file, write_real_image  # noqa: E402
from tmem.sizes import format_size, parse_size  # noqa: E402


def wait_for(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start")
        time.sleep(0.05)


class Server:
    def __init__(self, kind: str, tmp: Path, size: int, extra: list[str]) -> None:
        self.kind = kind
        self.is_tmem = kind != "nbdkit"
        self.sock = tmp / f"{kind}.sock"
        self.stats_url: str | None = None
        if kind == "nbdkit":
            cmd = ["nbdkit", "-f", "-U", str(self.sock), "memory", str(size), *extra]
            self.proc = subprocess.Popen(cmd)
            wait_for(self.sock, self.proc, "nbdkit")
        else:
            ready = tmp / f"{kind}.ready"
            ready.unlink(missing_ok=True)
            cmd = [
                sys.executable, "-m", "tmem", "serve", "--listen", f"unix:{self.sock}",
                "--size", str(size), "--ready-file", str(ready), "--stats", "127.0.0.1:0",
                "--log-level", "warning", *extra,
            ]  # fmt: skip
            env = dict(os.environ) if INSTALLED else dict(os.environ, PYTHONPATH=str(SRC))
            self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
            wait_for(ready, self.proc, "tmem serve")
            self.stats_url = json.loads(ready.read_text())["stats"]

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stats(self) -> dict[str, Any]:
        assert self.stats_url
        with urllib.request.urlopen(self.stats_url + "/stats", timeout=10) as r:
            data: dict[str, Any] = json.load(r)
        return data

    def settle(self, timeout: float = 300.0) -> tuple[float, dict[str, Any]]:
        """Wait until compress-behind has compressed every staged page; return the
        seconds waited and the zcache stats then. Fails if it never gets there."""
        t0 = time.perf_counter()
        while True:
            zs = self.stats()["zcache"]
            if not zs.get("staged_pages", 0):
                return time.perf_counter() - t0, zs
            if time.perf_counter() - t0 > timeout:
                raise SystemExit(f"{self.kind}: pages still staged after {timeout:.0f} s")
            time.sleep(POLL)  # /stats walks every page: not much harder than this

    def cpu(self) -> float:
        """CPU seconds (user + system, all threads) the server process has used."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss(self) -> int:
        """Resident bytes of the server process (VmRSS)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=60)


POLL = 0.05  # seconds between /stats polls while waiting for compress-behind


def copy_opts(args: argparse.Namespace) -> list[str]:
    """nbdcopy caps connections at its thread count (nproc by default): raise both."""
    return [f"--connections={args.connections}", f"--threads={args.connections}"]


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr}")
    return dt


def qemu_bench(uri: str, count: int, write: bool) -> float:
    cmd = ["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", "32", "-s", "4096"]
    if write:
        cmd += ["-w", "--pattern", "0x5a"]
    res = subprocess.run([*cmd, uri], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"qemu-img bench failed:\n{res.stderr}")
    m = re.search(r"Run completed in ([0-9.]+) seconds", res.stdout)
    if not m:
        raise SystemExit(f"cannot parse qemu-img bench output:\n{res.stdout}")
    return count / float(m.group(1))


SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's python3-libnbd imports only here


def has_libnbd_python() -> bool:
    res = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True)
    return res.returncode == 0


def real_writes(uri: str, image: Path, count: int, stats_url: str | None) -> tuple[int, float]:
    """4 KiB writes of the image's non-fill pages at depth 32 (nbd_aio_writes.py):
    (writes, writes per second). With ``stats_url`` (tmem) the time runs until the
    server reports no staged pages: the write counts until it is compressed."""
    helper = Path(__file__).with_name("nbd_aio_writes.py")
    cmd = [SYSTEM_PYTHON, str(helper), uri, str(image), str(count)]
    if stats_url:
        cmd.append(stats_url + "/stats")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"nbd_aio_writes.py failed:\n{res.stderr}")
    writes, seconds = res.stdout.split()
    return int(writes), int(writes) / float(seconds)


def throughput(args: argparse.Namespace, tmp: Path, image: Path, digest: str) -> dict[str, Any]:
    """Both servers run at once and every measurement alternates between them, so a
    change in machine load hits both sides alike; each figure is the best of --repeat."""
    size = image.stat().st_size
    kinds = ("nbdkit", "tmem", "tmem-sync")
    servers: dict[str, Server] = {}
    best: dict[str, dict[str, float]] = {k: {} for k in kinds}
    settled: dict[str, dict[str, float]] = {}
    rss: dict[str, int] = {}

    cpu: dict[str, dict[str, float]] = {k: {} for k in kinds}  # CPU s per page/request

    def keep(kind: str, what: str, value: float) -> None:
        best[kind][what] = max(best[kind].get(what, 0.0), value)

    def charge(kind: str, what: str, seconds: float, units: int) -> None:
        """Keep the lowest CPU cost per unit seen for ``what``."""
        per = seconds / units
        cpu[kind][what] = min(cpu[kind].get(what, per), per)

    try:
        for kind in kinds:
            extra = [] if kind == "nbdkit" else ["--memory", str(args.memory_bytes)]
            if kind == "tmem-sync":
                extra.append("--no-compress-behind")
            servers[kind] = Server(kind, tmp, size, extra)
        ok: dict[str, bool] = {}
        for _ in range(args.repeat):
            for kind in kinds:
                srv = servers[kind]
                uri = srv.uri
                c0 = srv.cpu()
                t0 = time.perf_counter()
                acked = timed(["nbdcopy", *copy_opts(args), str(image), uri])
                if srv.is_tmem:  # the write is done when everything is compressed
                    wait, zs = srv.settle()
                    settled[kind] = {
                        "seconds": round(wait, 3),
                        "compression_ratio": round(zs["compression_ratio"], 3),
                        "frames_used": zs["frames_used"],
                        "frames_total": zs["frames_total"],
                        "stored_pages": zs["stored_pages"],
                        "huge_pages": zs.get("huge_pages", 0),
                    }
                w = time.perf_counter() - t0
                c1 = srv.cpu()
                rss[kind] = srv.rss()
                keep(kind, "write_MBps", size / w / 1e6)
                keep(kind, "write_acked_MBps", size / acked / 1e6)
                charge(kind, "write_MBps", c1 - c0, size // 4096)
                out = tmp / f"out-{kind}.img"
                r = timed(["nbdcopy", *copy_opts(args), uri, str(out)])
                keep(kind, "read_MBps", size / r / 1e6)
                charge(kind, "read_MBps", srv.cpu() - c1, size // 4096)
                ok[kind] = ok.get(kind, True) and sha256_file(out) == digest
                out.unlink()
        for _ in range(args.repeat):
            for kind in kinds:
                srv = servers[kind]
                if args.real_writes:
                    c0 = srv.cpu()
                    writes, iops = real_writes(srv.uri, image, args.iops_count, srv.stats_url)
                    keep(kind, "real_write_iops", iops)
                    charge(kind, "real_write_iops", srv.cpu() - c0, writes)
                else:  # put real pages back over the last repeat's fill pattern (untimed)
                    timed(["nbdcopy", *copy_opts(args), str(image), srv.uri])
                # Reads first, while the region holds real pages (real_writes, or the
                # image); the fill-pattern write comes last, and the next repeat's
                # real_writes puts real pages back over it.
                for what, write in (("read_iops", False), ("fill_write_iops", True)):
                    if srv.is_tmem:  # no compaction left over from the step before
                        srv.settle()
                    c0 = srv.cpu()
                    keep(kind, what, qemu_bench(srv.uri, args.iops_count, write))
                    charge(kind, what, srv.cpu() - c0, args.iops_count)
    finally:
        rcs = {kind: srv.stop() for kind, srv in servers.items()}
    return {
        k: {
            **best[k],
            "cpu_us": {w: round(v * 1e6, 2) for w, v in cpu[k].items()},
            "rss_after_write": rss[k],
            "image_per_rss": round(size / rss[k], 3) if rss.get(k) else 0.0,
            "sha256_match": ok[k],
            "exit": rcs[k],
            **({"settled_after_last_write": settled[k]} if k in settled else {}),
        }
        for k in kinds
    }


def writeback_run(args: argparse.Namespace, tmp: Path, image: Path, digest: str) -> dict[str, Any]:
    """Write 4x the RAM budget with a backing file, read it all back."""
    size = image.stat().st_size
    memory = size // 4
    backing = tmp / "backing.img"
    srv = Server("tmem", tmp, size, ["--memory", str(memory), "--backing", str(backing)])
    try:
        t0 = time.perf_counter()
        res = subprocess.run(
            ["nbdcopy", *copy_opts(args), str(image), srv.uri], capture_output=True, text=True
        )
        srv.settle()  # counts until compress-behind is done, as in the throughput run
        elapsed = time.perf_counter() - t0
        st = srv.stats()
        out = tmp / "wb-out.img"
        subprocess.run(["nbdcopy", *copy_opts(args), srv.uri, str(out)], check=True)
        ok = sha256_file(out) == digest
        out.unlink()
    finally:
        rc = srv.stop()
        backing.unlink(missing_ok=True)
    b = st["blockdev"]
    return {
        "image": format_size(size),
        "memory": format_size(memory),
        "seconds": elapsed,
        "nbdcopy_exit": res.returncode,
        "ram_stores": b["blockdev_ram_stores"],
        "ram_pages_per_s": b["blockdev_ram_stores"] / elapsed,
        "writeback_pages": b["blockdev_writeback_pages"],
        "writeback_MBps": b["blockdev_writeback_bytes"] / elapsed / 1e6,
        "backing_stores": b["blockdev_backing_stores"],
        "enospc": b["blockdev_enospc"],
        "request_errors": st["server"]["server_request_errors"],
        "sha256_match": ok,
        "exit": rc,
    }


def report(
    what: str,
    label: str,
    fmt: str,
    base: dict[str, Any],
    res: dict[str, Any],
    tmems: tuple[str, ...],
    unit: str,
    cpu_of: str | None = None,
) -> None:
    """One line per measure: nbdkit, then each tmem variant with its ratio to nbdkit."""
    line = f"  {label:24s} nbdkit {base[what]:{fmt}}"
    for t in tmems:
        line += f" | {t} {res[t][what]:{fmt}} ({res[t][what] / base[what]:.2f}x)"
    print(line)
    if cpu_of is not None:
        cpu = f"nbdkit {base['cpu_us'][cpu_of]:.2f}"
        cpu += "".join(f" | {t} {res[t]['cpu_us'][cpu_of]:.2f}" for t in tmems)
        print(f"  {'  server CPU us/' + unit:24s} {cpu}")


def parse_memory(text: str, size: int) -> int:
    """``--memory``: a size, or a percentage of the image size; rounded to pages."""
    value = int(size * float(text[:-1]) / 100) if text.endswith("%") else parse_size(text)
    return value // 4096 * 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="256MiB")
    ap.add_argument(
        "--memory",
        default="75%",
        help="tmem RAM budget for the throughput run: a size or a %% of --size; must be"
        " smaller than --size (default 75%%)",
    )
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--iops-count", type=int, default=100000)
    ap.add_argument("--skip-writeback", action="store_true")
    args = ap.parse_args()
    size = parse_size(args.size)
    args.memory_bytes = parse_memory(args.memory, size)
    if not 0 < args.memory_bytes < size:
        raise SystemExit(
            f"--memory {args.memory} ({format_size(args.memory_bytes)}) must be smaller than"
            f" the image ({format_size(size)}): tmem has to compress to hold it"
        )
    args.real_writes = has_libnbd_python()
    for tool in ("nbdkit", "nbdcopy", "qemu-img"):
        if shutil.which(tool) is None:
            raise SystemExit(
                f"{tool} is not installed (apt-get install nbdkit libnbd-bin qemu-utils)"
            )
    with tempfile.TemporaryDirectory(prefix="tmem-nbd-bench-") as d:
        tmp = Path(d)
        image = tmp / "image.raw"
        digest = write_real_image(image, size)
        res = throughput(args, tmp, image, digest)
        k = res["nbdkit"]
        tmems = ("tmem", "tmem-sync")
        print(
            f"baseline nbdkit memory {format_size(size)} (raw, sparse) vs tmem serve --memory"
            f" {format_size(args.memory_bytes)} ({args.memory_bytes / size:.0%} of the image);"
        )
        print(
            f"nbdcopy of a {format_size(size)} real-data image, {args.connections} connections,"
            f" best of {args.repeat}; tmem's write counts until staged_pages == 0:"
        )
        report("write_MBps", "write MB/s (compressed)", ".1f", k, res, tmems, "page", "write_MBps")
        report("write_acked_MBps", "  (MB/s at nbdcopy exit)", ".1f", k, res, tmems, "page")
        report("read_MBps", "read MB/s", ".1f", k, res, tmems, "page", "read_MBps")
        for t in tmems:
            info = res[t].get("settled_after_last_write", {})
            print(
                f"  {t}: compressed everything {info.get('seconds', 0):.2f} s after nbdcopy"
                f" returned; compression ratio {info.get('compression_ratio', 0):.3f}, frames"
                f" used {info.get('frames_used', 0):,} of {info.get('frames_total', 0):,}"
                f" ({info.get('huge_pages', 0):,} pages raw); sha256 identical"
                f" {res[t]['sha256_match']}"
            )
        print(f"  nbdkit sha256 identical {k['sha256_match']}")
        print(
            "  server RSS after the write: "
            + " | ".join(
                f"{n} {format_size(r['rss_after_write'])} (image/RSS {r['image_per_rss']:.2f})"
                for n, r in res.items()
            )
        )
        if args.real_writes:
            print(
                f"libnbd 4 KiB writes of the image's real pages, depth 32, {args.iops_count}"
                " pages less the same-filled ones, best of"
                f" {args.repeat}; tmem's time runs until staged_pages == 0. The client is"
                " Python and may be the limit, so compare the server CPU per request too:"
            )
            report(
                "real_write_iops", "real-page writes/s", ".0f", k, res, tmems, "request",
                "real_write_iops",
            )  # fmt: skip
        else:
            print(f"  (no libnbd for {SYSTEM_PYTHON}: real-page 4 KiB writes skipped)")
        print(
            f"qemu-img bench 4 KiB, depth 32, {args.iops_count} requests, best of {args.repeat}"
            " (reads are of real pages, before the fill-pattern writes):"
        )
        report("read_iops", "read IOPS", ".0f", k, res, tmems, "request", "read_iops")
        report(
            "fill_write_iops", "fill-pattern write IOPS", ".0f", k, res, tmems, "request",
            "fill_write_iops",
        )  # fmt: skip
        print(
            "  (qemu-img bench -w writes ONE fill pattern, which tmem stores as a pattern"
            " without compressing: not a real-data write figure)"
        )
        print("  exit codes after SIGTERM: " + " ".join(f"{n} {r['exit']}" for n, r in res.items()))
        if not args.skip_writeback:
            wb = writeback_run(args, tmp, image, digest)
            print(f"writeback run ({wb['image']} into {wb['memory']} RAM + backing file):")
            for key, value in wb.items():
                print(
                    f"  {key:16s} {value:.1f}"
                    if isinstance(value, float)
                    else f"  {key:16s} {value}"
                )
        print(json.dumps({"throughput": res, **({} if args.skip_writeback else {"writeback": wb})}))


if __name__ == "__main__":
    main()
