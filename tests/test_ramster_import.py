"""Plain tmem never loads the cluster layer (RAMster is optional)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

PROBE = """
import sys
import tmem
zc = tmem.Zcache("1MiB")
pool = zc.new_pool(persistent=True)
page = bytes(range(256)) * 16
assert zc.put(pool, (1, 2, 3), 4, page)
assert zc.get(pool, (1, 2, 3), 4) == page
zc.flush_page(pool, (1, 2, 3), 4)
zc.stats()
import tmem.cli
import tmem.nbd.cli
import tmem.nbd.server
from tmem.nbd.config import load_config
dev = tmem.nbd.server.build_device(load_config(None, {"size": "1MiB", "memory": "1MiB"}))
dev.write(0, page)
assert dev.read(0, 4096) == page
from click.testing import CliRunner
assert CliRunner().invoke(tmem.cli.main, ["--help"]).exit_code == 0
loaded = sorted(m for m in sys.modules if m == "tmem.ramster" or m.startswith("tmem.ramster."))
print(",".join(loaded) or "none")
"""


def test_import_tmem_zcache_and_plain_nbd_serve_load_no_ramster() -> None:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "none"


def test_tmem_cluster_command_is_lazy_and_works(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("a-long-enough-secret\n")
    cf = tmp_path / "c.toml"
    cf.write_text(
        '[cluster]\nname = "lab"\nsecret_file = "s"\nreplicas = 1\n'
        '[[node]]\nname = "a"\nnumber = 1\nhost = "127.0.0.1"\nport = 7701\n'
        '[[node]]\nname = "b"\nnumber = 2\nhost = "127.0.0.2"\nport = 7702\n'
    )
    env = dict(os.environ, PYTHONPATH=str(SRC))
    run = [sys.executable, "-m", "tmem", "cluster"]
    out = subprocess.run([*run, "check", str(cf)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "2 nodes" in out.stdout
    out = subprocess.run(
        [*run, "add-node", str(cf), "--name", "c", "--number", "3", "--address", "127.0.0.3:7703"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    out = subprocess.run([*run, "check", str(cf)], env=env, capture_output=True, text=True)
    assert "3 nodes" in out.stdout and "127.0.0.3:7703" in out.stdout
    out = subprocess.run(
        [*run, "add-node", str(cf), "--name", "d", "--number", "3", "--address", "127.0.0.4:1"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "used twice" in out.stderr
    out = subprocess.run(
        [*run, "remove-node", str(cf), "--name", "a"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    out = subprocess.run([*run, "check", str(cf)], env=env, capture_output=True, text=True)
    assert "2 nodes" in out.stdout and " a " not in out.stdout
    out = subprocess.run(
        [*run, "serve", "--cluster", str(cf), "--node", "zz"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "no node 'zz'" in out.stderr
