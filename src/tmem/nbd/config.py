"""Configuration of ``tmem serve``: one dataclass, filled from TOML then the CLI.

The TOML keys are the long option names (``listen``, ``size``, ``memory``,
``compressor``, ``backing``, ``export-name`` or ``export_name``, ``stats``, ``mlock``,
``compress-behind``, ``allocator``, ``prefault``, ``recompress``, ``recompress-after``,
``log-level``); options given on the command line override the file. Every value is
validated here so a bad file fails with one clear :class:`tmem.ConfigError` before
anything listens. Durations (``recompress-after``) are strings like ``"30s"``,
``"500ms"``, ``"2m"`` or a number of seconds.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tmem.compress import COMPRESSORS, get_compressor
from tmem.errors import ConfigError
from tmem.sizes import parse_duration, parse_size
from tmem.zcache import ALLOCATORS

DEFAULT_LISTEN = "127.0.0.1:10809"
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(slots=True)
class Address:
    """A listen address: TCP ``host:port`` or ``unix:/path``."""

    host: str | None = None
    port: int = 0
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> Address:
        if text.startswith("unix:"):
            path = text[5:]
            if not path:
                raise ConfigError(f"empty unix socket path in {text!r}")
            return cls(path=path)
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"listen address must be HOST:PORT or unix:/path, got {text!r}")
        host = host.strip("[]") or "127.0.0.1"
        return cls(host=host, port=int(port))

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return (
            f"[{self.host}]:{self.port}" if ":" in (self.host or "") else f"{self.host}:{self.port}"
        )


@dataclass(slots=True)
class ServeConfig:
    """Everything needed to build a server; see :func:`load_config`."""

    listen: list[Address] = field(default_factory=lambda: [Address.parse(DEFAULT_LISTEN)])
    size: int = 1 << 30
    memory: int = 256 << 20
    compressor: str = "lz4"
    backing: str | None = None
    export_name: str = ""
    stats: Address | None = None
    mlock: bool = False
    compress_behind: bool = True
    allocator: str = "zsmalloc"
    prefault: bool = False
    recompress: str | None = None  # the strong codec for idle pages; None: off
    recompress_after: float = 30.0  # seconds a page must be idle to be recompressed
    log_level: str = "info"
    ready_file: str | None = None
    # Names set by the file or the command line (the rest are defaults): a cluster
    # node's export lets its cluster file decide what its serve options leave open.
    given: frozenset[str] = field(default_factory=frozenset, compare=False, repr=False)

    @property
    def arena_prefault(self) -> bool:
        """Whether the store's frames must be resident from the start: ``prefault``, or
        ``mlock``, under which memory on demand is impossible (mlockall makes the kernel
        fault in the whole arena when it is mapped, and refuses to take locked pages
        back, so frames could never be returned)."""
        return self.prefault or self.mlock

    def validate(self) -> ServeConfig:
        if self.size <= 0 or self.size % 4096:
            raise ConfigError(f"--size must be a positive multiple of 4 KiB, got {self.size}")
        if self.memory < 4096:
            raise ConfigError(f"--memory must be at least one page, got {self.memory}")
        if self.compressor not in COMPRESSORS:
            raise ConfigError(
                f"unknown compressor {self.compressor!r} (choose from {', '.join(COMPRESSORS)})"
            )
        self.allocator = self.allocator.lower().strip()
        if self.allocator not in ALLOCATORS:
            raise ConfigError(
                f"unknown allocator {self.allocator!r} (choose from {', '.join(ALLOCATORS)})"
            )
        if self.recompress is not None:
            if self.recompress.lower().strip() in ("", "none", "off"):
                self.recompress = None
            else:
                try:
                    get_compressor(self.recompress)  # zstd, zstd-N, ...; imports it now
                except ConfigError as exc:
                    raise ConfigError(f"--recompress: {exc} (zstd-N: levels 1-22)") from None
        if self.recompress_after < 0:
            raise ConfigError(
                f"--recompress-after must not be negative, got {self.recompress_after}"
            )
        if len(self.export_name.encode()) > 4096:
            raise ConfigError("--export-name is longer than 4096 bytes")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        if not self.listen:
            raise ConfigError("need at least one --listen address")
        if self.stats is not None and self.stats.path is not None:
            raise ConfigError("--stats must be HOST:PORT")
        return self


_NAMES = {f.name for f in fields(ServeConfig)} - {"given"}


def _coerce(name: str, value: Any) -> Any:
    if name == "listen":
        items = (
            [value]
            if isinstance(value, str)
            else list(value)
            if isinstance(value, tuple)
            else value
        )
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ConfigError("listen must be a string or a list of strings")
        return [Address.parse(v) for v in items]
    if name in ("size", "memory"):
        if not isinstance(value, int | str):
            raise ConfigError(f"{name} must be a size like 1GiB, got {value!r}")
        return parse_size(value)
    if name == "stats":
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError(f"stats must be HOST:PORT, got {value!r}")
        return Address.parse(value)
    if name == "recompress_after":
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"recompress-after must be a duration like 30s, got {value!r}")
        return parse_duration(value)
    if name in ("mlock", "compress_behind", "prefault"):
        if not isinstance(value, bool):
            raise ConfigError(f"{name.replace('_', '-')} must be true or false, got {value!r}")
        return value
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{name.replace('_', '-')} must be a string, got {value!r}")
    return value


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> ServeConfig:
    """Defaults, then the TOML file at ``path``, then ``overrides`` (CLI values).

    ``overrides`` entries whose value is None (option not given) are ignored, so the
    file's value wins over the default but the command line wins over the file.
    Unknown keys are an error: a typo must not silently fall back to a default.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        section = data.get("serve", data)
        if not isinstance(section, dict):
            raise ConfigError(f"[serve] in {path} must be a table")
        for key, value in section.items():
            name = key.replace("-", "_")
            if name not in _NAMES:
                # other tools' sections (e.g. [cluster]) may share the file
                if isinstance(value, dict):
                    continue
                raise ConfigError(f"unknown key {key!r} in {path}")
            values[name] = _coerce(name, value)
    for key, value in (overrides or {}).items():
        name = key.replace("-", "_")
        if name not in _NAMES:
            raise ConfigError(f"unknown option {key!r}")
        if value is None or (name == "listen" and not value):
            continue
        values[name] = _coerce(name, value)
    return ServeConfig(**values, given=frozenset(values)).validate()
