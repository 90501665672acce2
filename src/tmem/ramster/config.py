"""Cluster configuration: the kernel's nodemanager (configfs) as one TOML file.

The file names the cluster, its shared secret and every node; all nodes read the
same file, so a node learns its peers, their numbers and addresses from it.  The
kernel wrote each configfs attribute once and refused changes while connected;
here the whole file is re-read (SIGHUP or ``tmem cluster add-node/remove-node``)
and :func:`diff` says which nodes appeared or vanished, so the running node can
connect to or drop exactly those.

```toml
[cluster]
name = "lab"
secret_file = "lab.secret"      # or: secret = "..."
replicas = 2
heartbeat_interval = 0.5         # optional timing keys, seconds
dead_after = 3.0
policy = "least-loaded"          # or "manual" with target = "n2"
allocator = "zsmalloc"           # optional store keys, every node's default
prefault = false                 # (tmem cluster serve / tmem serve options win)
recompress = "zstd"              # default off
recompress_after = "30s"
[[node]]
name = "n1"
number = 1
host = "127.0.0.1"
port = 7701
```
"""

from __future__ import annotations

import ipaddress
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tmem.compress import get_compressor
from tmem.errors import ConfigError
from tmem.sizes import parse_duration
from tmem.zcache import ALLOCATORS

POLICIES = ("least-loaded", "manual")
MAX_NODE_NUMBER = 254  # the kernel's limit (u8, 255 reserved)
MAX_NAME = 64

_CLUSTER_KEYS = {
    "name",
    "secret",
    "secret_file",
    "replicas",
    "heartbeat_interval",
    "dead_after",
    "keepalive",
    "idle_timeout",
    "request_timeout",
    "reconnect_min",
    "reconnect_max",
    "policy",
    "target",
    "remotify_interval",
    "remotify_batch",
    "low_watermark",
    "high_watermark",
    "remotify_ephemeral",
    "remotify_persistent",
    "allocator",
    "prefault",
    "recompress",
    "recompress_after",
}
_NODE_KEYS = {"name", "number", "host", "port"}


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One cluster member as the config file describes it."""

    name: str
    number: int
    host: str
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """A validated cluster file; timings in seconds, watermarks as fractions of frames."""

    name: str
    secret: bytes
    nodes: tuple[NodeSpec, ...]
    replicas: int = 2
    heartbeat_interval: float = 1.0
    dead_after: float = 5.0
    keepalive: float = 2.0
    idle_timeout: float = 10.0
    request_timeout: float = 5.0
    reconnect_min: float = 0.1
    reconnect_max: float = 5.0
    policy: str = "least-loaded"
    target: str | None = None
    remotify_interval: float = 1.0
    remotify_batch: int = 128
    low_watermark: float = 0.25
    high_watermark: float = 0.5
    remotify_ephemeral: bool = True
    remotify_persistent: bool = True
    # the store every node builds, unless its command line says otherwise
    allocator: str = "zsmalloc"
    prefault: bool = False
    recompress: str | None = None
    recompress_after: float = 30.0
    path: Path | None = field(default=None, compare=False)

    def node(self, name: str) -> NodeSpec:
        """The node called ``name`` (ConfigError if the file has none)."""
        for spec in self.nodes:
            if spec.name == name:
                return spec
        known = ", ".join(n.name for n in self.nodes) or "none"
        raise ConfigError(f"cluster {self.name!r} has no node {name!r} (nodes: {known})")

    def by_number(self, number: int) -> NodeSpec | None:
        for spec in self.nodes:
            if spec.number == number:
                return spec
        return None

    @property
    def target_number(self) -> int | None:
        """Node number of the manual target, if the policy is manual."""
        return None if self.target is None else self.node(self.target).number


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    """What a reload changed: nodes to connect to, nodes to drop."""

    added: tuple[NodeSpec, ...]
    removed: tuple[NodeSpec, ...]
    changed: tuple[NodeSpec, ...]  # same number, new name/address: reconnect

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def _number(section: str, key: str, value: Any, *, lo: float, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"[{section}] {key} must be a number, got {value!r}")
    if not (lo <= value <= hi) or math.isnan(value):
        raise ConfigError(f"[{section}] {key} = {value!r} is out of range [{lo}, {hi}]")
    return float(value)


def _integer(section: str, key: str, value: Any, *, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"[{section}] {key} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"[{section}] {key} = {value} is out of range [{lo}, {hi}]")
    return value


def _string(section: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        raise ConfigError(
            f"[{section}] {key} must be a non-empty string of at most "
            f"{MAX_NAME} characters, got {value!r}"
        )
    return value


def _parse_node(i: int, raw: Any) -> NodeSpec:
    where = f"node #{i + 1}"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[[node]] #{i + 1} must be a table")
    unknown = set(raw) - _NODE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in sorted(_NODE_KEYS):
        if key not in raw:
            raise ConfigError(f"{where}: missing key {key!r}")
    name = _string(where, "name", raw["name"])
    where = f"node {name!r}"
    number = _integer(where, "number", raw["number"], lo=0, hi=MAX_NODE_NUMBER)
    host = _string(where, "host", raw["host"])
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not all(part.isalnum() or "-" in part for part in host.split(".")):
            raise ConfigError(
                f"{where}: host {host!r} is neither an IP address nor a host name"
            ) from None
    port = _integer(where, "port", raw["port"], lo=1, hi=65535)
    return NodeSpec(name, number, host, port)


def parse_config(data: Mapping[str, Any], base_dir: Path | None = None) -> ClusterConfig:
    """Validate a decoded TOML document; ``base_dir`` resolves a relative secret_file."""
    unknown_top = set(data) - {"cluster", "node"}
    if unknown_top:
        raise ConfigError(f"unknown section(s): {', '.join(sorted(unknown_top))}")
    cluster = data.get("cluster")
    if not isinstance(cluster, Mapping):
        raise ConfigError("missing [cluster] section")
    unknown = set(cluster) - _CLUSTER_KEYS
    if unknown:
        raise ConfigError(f"[cluster]: unknown key(s) {', '.join(sorted(unknown))}")
    if "name" not in cluster:
        raise ConfigError("[cluster]: missing key 'name'")
    name = _string("cluster", "name", cluster["name"])

    if "secret" in cluster and "secret_file" in cluster:
        raise ConfigError("[cluster]: give either secret or secret_file, not both")
    if "secret" in cluster:
        if not isinstance(cluster["secret"], str):
            raise ConfigError("[cluster] secret must be a string")
        secret = cluster["secret"].encode()
    elif "secret_file" in cluster:
        if not isinstance(cluster["secret_file"], str):
            raise ConfigError("[cluster] secret_file must be a string")
        spath = Path(cluster["secret_file"]).expanduser()
        if not spath.is_absolute() and base_dir is not None:
            spath = base_dir / spath
        try:
            secret = spath.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(
                f"[cluster] cannot read secret_file {str(spath)!r}: {exc.strerror}"
            ) from None
    else:
        raise ConfigError("[cluster]: a shared secret is required (secret or secret_file)")
    if len(secret) < 8:
        raise ConfigError("[cluster]: the secret must be at least 8 bytes")

    raw_nodes = data.get("node", [])
    if not isinstance(raw_nodes, list):
        raise ConfigError("nodes must be given as [[node]] tables")
    nodes = tuple(_parse_node(i, raw) for i, raw in enumerate(raw_nodes))
    if not nodes:
        raise ConfigError("the cluster has no [[node]]")
    _check_unique(nodes)

    kw: dict[str, Any] = {}
    if "replicas" in cluster:
        kw["replicas"] = _integer("cluster", "replicas", cluster["replicas"], lo=1, hi=8)
    for key in (
        "heartbeat_interval",
        "dead_after",
        "keepalive",
        "idle_timeout",
        "request_timeout",
        "reconnect_min",
        "reconnect_max",
        "remotify_interval",
    ):
        if key in cluster:
            kw[key] = _number("cluster", key, cluster[key], lo=0.001, hi=86400)
    if "remotify_batch" in cluster:
        kw["remotify_batch"] = _integer(
            "cluster", "remotify_batch", cluster["remotify_batch"], lo=1, hi=4096
        )
    for key in ("low_watermark", "high_watermark"):
        if key in cluster:
            kw[key] = _number("cluster", key, cluster[key], lo=0.0, hi=1.0)
    kw.update(parse_store_keys("cluster", cluster))
    for key in ("remotify_ephemeral", "remotify_persistent"):
        if key in cluster:
            if not isinstance(cluster[key], bool):
                raise ConfigError(f"[cluster] {key} must be true or false")
            kw[key] = cluster[key]
    if "policy" in cluster:
        if cluster["policy"] not in POLICIES:
            raise ConfigError(
                f"[cluster] policy must be one of {', '.join(POLICIES)}, got {cluster['policy']!r}"
            )
        kw["policy"] = cluster["policy"]
    if "target" in cluster:
        kw["target"] = _string("cluster", "target", cluster["target"])

    cfg = ClusterConfig(name=name, secret=secret, nodes=nodes, path=None, **kw)
    _check_consistency(cfg)
    return cfg


def parse_store_keys(section: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The store keys of a section (``allocator``, ``prefault``, ``recompress``,
    ``recompress_after``), validated; keys that are absent are left out."""
    kw: dict[str, Any] = {}
    if "allocator" in raw:
        value = raw["allocator"]
        if not isinstance(value, str) or value.lower().strip() not in ALLOCATORS:
            raise ConfigError(
                f"[{section}] allocator must be one of {', '.join(ALLOCATORS)}, got {value!r}"
            )
        kw["allocator"] = value.lower().strip()
    if "prefault" in raw:
        if not isinstance(raw["prefault"], bool):
            raise ConfigError(f"[{section}] prefault must be true or false")
        kw["prefault"] = raw["prefault"]
    if "recompress" in raw:
        value = raw["recompress"]
        if not isinstance(value, str):
            raise ConfigError(f"[{section}] recompress must be a codec name like zstd-3")
        if value.lower().strip() in ("", "none", "off"):
            kw["recompress"] = None
        else:
            try:
                get_compressor(value)
            except ConfigError as exc:
                raise ConfigError(f"[{section}] recompress: {exc} (zstd-N: 1-22)") from None
            kw["recompress"] = value
    if "recompress_after" in raw:
        value = raw["recompress_after"]
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"[{section}] recompress_after must be a duration like 30s")
        try:
            kw["recompress_after"] = parse_duration(value)
        except ConfigError as exc:
            raise ConfigError(f"[{section}] recompress_after: {exc}") from None
    return kw


def _check_unique(nodes: tuple[NodeSpec, ...]) -> None:
    seen_names: set[str] = set()
    seen_numbers: set[int] = set()
    seen_addr: set[tuple[str, int]] = set()
    for n in nodes:
        if n.name in seen_names:
            raise ConfigError(f"node name {n.name!r} is used twice")
        if n.number in seen_numbers:
            raise ConfigError(f"node number {n.number} is used twice (node {n.name!r})")
        if n.address in seen_addr:
            raise ConfigError(f"address {n.host}:{n.port} is used twice (node {n.name!r})")
        seen_names.add(n.name)
        seen_numbers.add(n.number)
        seen_addr.add(n.address)


def _check_consistency(cfg: ClusterConfig) -> None:
    if len(cfg.nodes) > 1 and cfg.replicas > len(cfg.nodes) - 1:
        raise ConfigError(
            f"[cluster] replicas = {cfg.replicas} needs at least {cfg.replicas + 1} nodes "
            f"(each remote copy lives on a different node than its owner); "
            f"the cluster has {len(cfg.nodes)}"
        )
    if cfg.policy == "manual":
        if cfg.target is None:
            raise ConfigError('[cluster] policy = "manual" needs target = "<node name>"')
        cfg.node(cfg.target)
    elif cfg.target is not None:
        raise ConfigError('[cluster] target is only meaningful with policy = "manual"')
    if cfg.idle_timeout <= cfg.keepalive:
        raise ConfigError(
            f"[cluster] idle_timeout must exceed keepalive ({cfg.idle_timeout} <= {cfg.keepalive})"
        )
    if cfg.dead_after <= cfg.heartbeat_interval:
        raise ConfigError(
            "[cluster] dead_after must exceed heartbeat_interval "
            f"({cfg.dead_after} <= {cfg.heartbeat_interval})"
        )
    if cfg.reconnect_max < cfg.reconnect_min:
        raise ConfigError("[cluster] reconnect_max must be >= reconnect_min")
    if cfg.high_watermark < cfg.low_watermark:
        raise ConfigError("[cluster] high_watermark must be >= low_watermark")


def load_config(path: str | Path) -> ClusterConfig:
    """Read and validate a cluster file (ConfigError names what is wrong)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read cluster file {str(p)!r}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    cfg = parse_config(data, base_dir=p.parent)
    return replace(cfg, path=p)


def diff(old: ClusterConfig, new: ClusterConfig) -> ConfigDiff:
    """Nodes added, removed or re-addressed between two versions of the file."""
    old_by = {n.number: n for n in old.nodes}
    new_by = {n.number: n for n in new.nodes}
    added = tuple(n for num, n in sorted(new_by.items()) if num not in old_by)
    removed = tuple(n for num, n in sorted(old_by.items()) if num not in new_by)
    changed = tuple(n for num, n in sorted(new_by.items()) if num in old_by and old_by[num] != n)
    return ConfigDiff(added, removed, changed)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def edit_nodes(
    path: str | Path, *, add: NodeSpec | None = None, remove: str | None = None
) -> ClusterConfig:
    """Add or remove a [[node]] in the file, validate the result, then rewrite it.

    The [cluster] table is kept as written (raw values, including secret_file),
    so the rewrite changes nothing else.  Nothing is written if the result is
    invalid.
    """
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read cluster file {str(p)!r}: {exc}") from None
    nodes: list[dict[str, Any]] = list(data.get("node", []))
    if remove is not None:
        kept = [n for n in nodes if n.get("name") != remove]
        if len(kept) == len(nodes):
            raise ConfigError(f"no node {remove!r} in {p}")
        nodes = kept
    if add is not None:
        nodes.append({"name": add.name, "number": add.number, "host": add.host, "port": add.port})
    data["node"] = nodes
    cfg = parse_config(data, base_dir=p.parent)
    lines = ["[cluster]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in data["cluster"].items()]
    for n in nodes:
        lines += ["", "[[node]]"]
        lines += [f"{k} = {_toml_value(n[k])}" for k in ("name", "number", "host", "port")]
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(p)
    return replace(cfg, path=p)
