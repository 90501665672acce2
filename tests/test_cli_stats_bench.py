"""The ``tmem`` command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def tmem(*args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    full_env = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "tmem", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=240,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc.stdout if check else proc.stdout + proc.stderr


def test_help_lists_commands() -> None:
    out = tmem("--help")
    for name in ("bench", "stats", "serve", "cluster"):
        assert name in out


def test_stats_json_has_counters() -> None:
    data = json.loads(tmem("stats", "--json", "--pages", "600", "--memory", "512KiB"))
    for key in (
        "cleancache_succ_gets",
        "cleancache_puts",
        "frontswap_succ_stores",
        "frontswap_loads",
        "frontswap_invalidates",
        "eph_ate_tail",
        "compress_poor",
        "pers_zpages",
        "zs_objects",
        "orig_data_size",
        "compr_data_size",
        "mem_used_total",
        "compression_ratio",
    ):
        assert key in data, key
    # the demo stores 2/3 of the 600 pages through frontswap and loads every other one
    assert data["frontswap_succ_stores"] + data["frontswap_failed_stores"] == 400
    # persistent: every stored even offset loads back; at most 200 stores were odd ones
    assert data["frontswap_succ_stores"] - 200 <= data["frontswap_loads"] <= 200
    assert data["frontswap_loads"] > 0
    assert data["frames_total"] == 128  # 512KiB


def test_stats_table() -> None:
    out = tmem("stats", "--pages", "300", "--memory", "1M")
    assert "summary" in out and "zsmalloc" in out and "frontswap" in out
    assert "compression_ratio" in out


def test_stats_rejects_bad_size() -> None:
    out = tmem("stats", "--memory", "12 parsecs", check=False)
    assert "not a size" in out or "unknown size unit" in out


class _StatsHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path != "/stats":
            self.send_error(404)
            return
        # the shape `tmem serve --stats` sends
        body = json.dumps(
            {
                "zcache": {"compression_ratio": 2.5, "zbud_eph_zpages": 7, "obj_count": 3},
                "blockdev": {"blockdev_reads": 3},
                "server": {"server_connections": 1},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stats_server() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _StatsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_stats_from_url(stats_server: str) -> None:
    data = json.loads(tmem("stats", "--url", stats_server, "--json"))
    assert data["zcache"]["compression_ratio"] == 2.5
    out = tmem("stats", "--url", stats_server + "/stats")
    for text in ("summary", "zbud_eph_zpages", "blockdev_reads", "server_connections"):
        assert text in out


def test_group_stats_splits_server_sections() -> None:
    from tmem.stats_cli import group_stats

    groups = group_stats(
        {
            "zcache": {"compression_ratio": 2.0, "zbud_pers_zpages": 1, "obj_count": 2},
            "blockdev": {"blockdev_reads": 3, "nested": {"x": 1}},
            "frontswap_loads": 4,
        }
    )
    assert groups == {
        "summary": {"compression_ratio": 2.0},
        "zcache": {"obj_count": 2},
        "zbud": {"zbud_pers_zpages": 1},
        "blockdev": {"blockdev_reads": 3, "nested.x": 1},
        "frontswap": {"frontswap_loads": 4},
    }


def test_stats_url_unreachable() -> None:
    out = tmem("stats", "--url", "http://127.0.0.1:9", check=False)
    assert "cannot fetch" in out


def _check_bench(data: dict[str, object]) -> None:
    for op in ("put", "get"):
        row = data[op]
        assert isinstance(row, dict)
        assert row["ratio"] == pytest.approx(row["zcache_pages_per_s"] / row["dict_pages_per_s"])
    assert "put_many" not in data  # a loop over put: no batch row
    assert data["verified"] is True
    density = data["density"]
    assert isinstance(density, dict)
    for side in ("zcache", "dict"):  # the same page set on both sides
        assert density[side]["offered_pages"] == data["pages"]
    assert density["zcache"]["refused_pages"] == data["rejects"]
    assert density["zcache"]["density"] > 1.0
    assert 0 < density["zcache"]["metadata_per_page"] < 1000
    assert density["dict"]["density"] > 1.0
    mixed = data["mixed"]
    assert isinstance(mixed, dict)
    assert mixed["pers_corrupt"] == 0 and mixed["eph_wrong_data"] == 0
    # the budget forced ouroboros: each evicted ephemeral frame went one of its two ways
    assert mixed["evicted_eph_pageframes"] == mixed["eph_ate_tail"] + mixed["pers_ate_eph"] > 0


def test_bench_json_small() -> None:
    data = json.loads(tmem("bench", "--pages", "2000", "--repeat", "1", "--json"))
    assert data["pages"] == 2000
    assert data["clock"] == "thread CPU time"
    assert data["allocator"] == "zsmalloc"
    assert "zs_frames" in data["zcache_stats"]
    _check_bench(data)


def test_bench_zbud_allocator() -> None:
    """--allocator zbud packs zcache's pages in buddies: the header and the JSON say so,
    and the store's own counters are zbud's."""
    args = ("bench", "--pages", "1500", "--repeat", "1", "--allocator", "zbud")
    data = json.loads(tmem(*args, "--json"))
    assert data["allocator"] == "zbud"
    assert "zbud_pers_zpages" in data["zcache_stats"] and "zs_frames" not in data["zcache_stats"]
    _check_bench(data)
    assert "allocator=zbud" in tmem(*args, "--no-density", "--no-mixed")


def test_bench_without_corpus_samples_pages() -> None:
    data = json.loads(
        tmem(
            "bench",
            "--pages",
            "1500",
            "--repeat",
            "1",
            "--json",
            "--memory",
            "64MiB",
            env={"TMEM_NO_CORPUS": "1"},
        )
    )
    assert "sampled" in data["corpus"]
    assert data["memory"] == 64 * 1024 * 1024
    _check_bench(data)


def test_bench_file_corpus_zstd_sizes() -> None:
    data = json.loads(
        tmem(
            "bench",
            "--corpus",
            "file",
            "--compressor",
            "zstd",
            "--pages",
            "1k",
            "--repeat",
            "1",
            "--memory",
            "128M",
            "--mixed-memory",
            "1MiB",
            "--json",
            "--no-density",
            "--clock",
            "wall",
            "--batch",
            "7",
        )
    )
    assert "put_many" not in data  # --batch is still accepted, but there is no batch row
    assert data["compressor"] == "zstd"
    assert data["clock"] == "wall clock"
    assert data["memory"] == 128 * 1024**2
    assert data["mixed"]["memory"] == 1024 * 1024
    assert data["density"] == {}


def test_bench_file_corpus_counts_refused_pages(tmp_path: Path) -> None:
    """A FILE corpus with incompressible pages: they are refused by zcache and charged
    to it as raw pages, so its density is below that of what it stored."""
    compressible = (b"tmem page " * 410)[:4096]
    blob = b"".join(
        os.urandom(4096) if i % 4 == 0 else compressible[i:] + compressible[:i] for i in range(64)
    )
    corpus = tmp_path / "pages.bin"
    corpus.write_bytes(blob)
    data = json.loads(
        tmem("bench", "--corpus", str(corpus), "--repeat", "1", "--no-mixed", "--json")
    )
    assert data["pages"] == 64 and data["verified"] is True
    z, naive = data["density"]["zcache"], data["density"]["dict"]
    assert z["refused_pages"] == data["rejects"] == 16
    assert naive["refused_pages"] == 0
    assert z["held_bytes"] >= z["ram_used"] + 16 * 4096
    assert z["density"] * z["held_bytes"] == pytest.approx(64 * 4096)
    assert z["density"] < z["density_zcache_only"]
    out = tmem("bench", "--corpus", str(corpus), "--repeat", "1", "--no-mixed")
    assert "ALL offered pages" in out and "refused" in out


def test_bench_bad_options() -> None:
    assert "not a size" in tmem("bench", "--memory", "lots", check=False)
    assert "no-such" in tmem("bench", "--corpus", "/no-such-dir", check=False)
    assert "page count" in tmem("bench", "--pages", "0", check=False)
    assert "'slab' is not one of" in tmem("bench", "--allocator", "slab", check=False)


def test_size_and_count_params() -> None:
    import click

    from tmem.bench_cli import CountParam, SizeParam

    size = SizeParam()
    assert size.convert("64MiB", None, None) == 64 * 1024**2
    assert size.convert("1G", None, None) == 1024**3
    assert size.convert("4096", None, None) == 4096
    with pytest.raises(click.BadParameter):
        size.convert("1 furlong", None, None)
    count = CountParam()
    assert count.convert("1e6", None, None) == 10**6
    assert count.convert("10k", None, None) == 10_000
    with pytest.raises(click.BadParameter):
        count.convert("1.5", None, None)


def test_stats_url_against_tmem_serve(tmp_path: Path) -> None:
    """`tmem stats --url` reads the /stats of a real `tmem serve` process."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    sock = tmp_path / "nbd.sock"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tmem",
            "serve",
            "--listen",
            f"unix:{sock}",
            "--size",
            "16MiB",
            "--memory",
            "4MiB",
            "--stats",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert "ready" in line, line
        url = line.split("stats ", 1)[1].split()[0]
        data = json.loads(tmem("stats", "--url", url, "--json"))
        assert data["zcache"]["frames_total"] == 1024
        out = tmem("stats", "--url", url)
        assert "summary" in out and "zsmalloc" in out and "blockdev" in out
    finally:
        server.terminate()
        server.wait(timeout=30)
