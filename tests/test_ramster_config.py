"""Cluster file parsing, validation, reload diff, node editing; policies; membership."""

from __future__ import annotations

from pathlib import Path

import pytest

from tmem.errors import ConfigError, TmemError
from tmem.ramster.config import NodeSpec, diff, edit_nodes, load_config, parse_config
from tmem.ramster.membership import EventKind, Membership, PeerState
from tmem.ramster.policy import LeastLoaded, Manual, make_policy

BASE = """
[cluster]
name = "lab"
secret_file = "lab.secret"
replicas = 2
[[node]]
name = "n1"
number = 1
host = "127.0.0.1"
port = 7701
[[node]]
name = "n2"
number = 2
host = "127.0.0.2"
port = 7702
[[node]]
name = "n3"
number = 3
host = "127.0.0.3"
port = 7703
"""


def _write(tmp_path: Path, text: str = BASE) -> Path:
    (tmp_path / "lab.secret").write_text("correct horse battery staple\n")
    p = tmp_path / "lab.toml"
    p.write_text(text)
    return p


def test_issue_example_parses(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path))
    assert cfg.name == "lab"
    assert cfg.secret == b"correct horse battery staple"
    assert cfg.replicas == 2
    assert [n.name for n in cfg.nodes] == ["n1", "n2", "n3"]
    assert cfg.node("n2") == NodeSpec("n2", 2, "127.0.0.2", 7702)
    assert cfg.by_number(3) is not None and cfg.by_number(3).host == "127.0.0.3"  # type: ignore[union-attr]
    assert cfg.policy == "least-loaded"


def test_default_replicas_is_two(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, BASE.replace("replicas = 2\n", "")))
    assert cfg.replicas == 2


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("number = 2", "number = 1"), "number 1 is used twice"),
        (lambda t: t.replace('name = "n2"', 'name = "n1"'), "name 'n1' is used twice"),
        (
            lambda t: t.replace('"127.0.0.2"\nport = 7702', '"127.0.0.1"\nport = 7701'),
            "address 127.0.0.1:7701 is used twice",
        ),
        (lambda t: t.replace('secret_file = "lab.secret"\n', ""), "secret is required"),
        (
            lambda t: t.replace('secret_file = "lab.secret"', 'secret_file = "nope"'),
            "cannot read secret_file",
        ),
        (lambda t: t.replace("replicas = 2", "replicas = 3"), "needs at least 4 nodes"),
        (lambda t: t.replace("replicas = 2", "replicas = 0"), "out of range"),
        (lambda t: t.replace("port = 7703", "port = 70000"), "out of range"),
        (lambda t: t.replace("port = 7703", 'port = "x"'), "must be an integer"),
        (lambda t: t.replace("replicas = 2", 'policy = "manual"'), "needs target"),
        (lambda t: t.replace("replicas = 2", 'policy = "manual"\ntarget = "n9"'), "no node 'n9'"),
        (lambda t: t.replace("replicas = 2", 'policy = "random"'), "policy must be one of"),
        (
            lambda t: t.replace("replicas = 2", "keepalive = 5\nidle_timeout = 2"),
            "idle_timeout must exceed keepalive",
        ),
        (lambda t: t.replace("replicas = 2", "colour = 1"), "unknown key"),
        (lambda t: t.replace('host = "127.0.0.3"\n', ""), "missing key 'host'"),
        (lambda t: t + "\n[[node]\n", "not valid TOML"),
        (lambda t: t.replace("replicas = 2", 'allocator = "slab"'), "allocator must be one of"),
        (lambda t: t.replace("replicas = 2", "prefault = 1"), "prefault must be true or false"),
        (lambda t: t.replace("replicas = 2", 'recompress = "gzip"'), "unknown compressor"),
        (
            lambda t: t.replace("replicas = 2", 'recompress_after = "-3s"'),
            "recompress_after: duration must not be negative",
        ),
        (lambda t: t.replace("replicas = 2", 'recompress_after = "3d"'), "unknown duration"),
    ],
)
def test_bad_files_are_refused_clearly(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=message) as info:
        load_config(_write(tmp_path, edit(BASE)))
    assert isinstance(info.value, TmemError)


def test_store_keys_are_every_nodes_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path))
    assert (cfg.allocator, cfg.prefault, cfg.recompress, cfg.recompress_after) == (
        "zsmalloc",
        False,
        None,
        30.0,
    )
    text = BASE.replace(
        "replicas = 2",
        'replicas = 2\nallocator = "zbud"\nprefault = true\nrecompress = "zstd-3"\n'
        'recompress_after = "2m"',
    )
    cfg = load_config(_write(tmp_path, text))
    assert (cfg.allocator, cfg.prefault, cfg.recompress, cfg.recompress_after) == (
        "zbud",
        True,
        "zstd-3",
        120.0,
    )
    cfg = load_config(_write(tmp_path, BASE.replace("replicas = 2", "recompress_after = 5")))
    assert cfg.recompress_after == 5.0
    # editing the node list keeps the store keys as written
    path = _write(tmp_path, text)
    cfg = edit_nodes(path, add=NodeSpec("n4", 4, "127.0.0.4", 7704))
    assert (cfg.allocator, cfg.recompress, cfg.recompress_after) == ("zbud", "zstd-3", 120.0)


def test_inline_secret_and_manual_target(tmp_path: Path) -> None:
    text = BASE.replace('secret_file = "lab.secret"', 'secret = "s3cr3t-s3cr3t"').replace(
        "replicas = 2", 'replicas = 1\npolicy = "manual"\ntarget = "n3"'
    )
    cfg = parse_config(__import__("tomllib").loads(text))
    assert cfg.secret == b"s3cr3t-s3cr3t"
    assert cfg.target_number == 3


def test_reload_diff_and_edit_nodes(tmp_path: Path) -> None:
    p = _write(tmp_path)
    old = load_config(p)
    new = edit_nodes(p, add=NodeSpec("n4", 4, "127.0.0.4", 7704))
    assert load_config(p) == new
    d = diff(old, new)
    assert [n.name for n in d.added] == ["n4"] and not d.removed and not d.changed
    newer = edit_nodes(p, remove="n2")
    d = diff(new, newer)
    assert [n.name for n in d.removed] == ["n2"] and not d.added
    assert not diff(newer, load_config(p))
    before = p.read_text()
    with pytest.raises(ConfigError, match="used twice"):
        edit_nodes(p, add=NodeSpec("n5", 1, "127.0.0.5", 7705))
    assert p.read_text() == before  # nothing written on a refused edit
    with pytest.raises(ConfigError, match="no node"):
        edit_nodes(p, remove="zz")


def test_policies() -> None:
    free = {2: 10, 3: 50, 4: 0, 5: 50}
    assert LeastLoaded().choose(free, 2) == [3, 5]
    assert LeastLoaded().choose(free, 5) == [3, 5, 2]  # never a full node
    assert LeastLoaded().choose(free, 2, exclude={3}) == [5, 2]
    assert Manual(2).choose(free, 1) == [2]
    assert Manual(2).choose(free, 2) == [2, 3]
    assert Manual(4).choose(free, 1) == [3]  # the target is full: fall back
    assert make_policy("manual", 2).name == "manual"
    with pytest.raises(ConfigError):
        make_policy("manual")


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_membership_up_down_restart_without_sleeping() -> None:
    nodes = [NodeSpec(f"n{i}", i, "127.0.0.1", 7700 + i) for i in (1, 2, 3)]
    clock = Clock()
    seen: list[tuple[EventKind, int]] = []
    m = Membership(
        nodes[0],
        nodes,
        dead_after=3.0,
        clock=clock,
        on_event=lambda e: seen.append((e.kind, e.node)),
    )
    assert m.up_nodes() == [] and m.peers[2].state is PeerState.UNKNOWN
    m.heard(2, incarnation=7, free_frames=100, total_frames=200)
    m.heard(3, incarnation=9, free_frames=300, total_frames=400)
    m.heard(99, incarnation=1, free_frames=1, total_frames=1)  # unknown: ignored
    assert m.up_nodes() == [2, 3]
    assert m.free_frames() == {2: 100, 3: 300}
    clock.t += 2.0
    m.heard(3, 9, 290, 400)
    assert m.tick() == []
    clock.t += 1.5  # node 2 silent for 3.5 s > 3.0
    assert [(e.kind, e.node) for e in m.tick()] == [(EventKind.DOWN, 2)]
    assert m.up_nodes() == [3] and m.free_frames() == {3: 290}
    m.heard(2, 8, 100, 200)  # back, with a new incarnation
    assert seen[-2:] == [(EventKind.RESTARTED, 2), (EventKind.UP, 2)]
    m.heard(3, 10, 1, 400)  # restarted inside the timeout: still noticed
    assert seen[-1] == (EventKind.RESTARTED, 3)
    assert m.stats()["membership_down_events"] == 1
    assert m.stats()["membership_up_events"] == 3
    ev = m.set_nodes(nodes[:2])
    assert [(e.kind, e.node) for e in ev] == [(EventKind.REMOVED, 3)]
    assert m.up_nodes() == [2]
    m.note_used(2, 30)
    assert m.free_frames() == {2: 70}
