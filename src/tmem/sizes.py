"""Human sizes (``64MiB``, ``1G``, ``4096``) and durations (``30s``, ``500ms``, ``2m``).

Binary and decimal suffixes are both accepted because operators write both;
a bare ``G``/``M``/``K`` is binary, as in ``free -h`` and most swap tools.
A duration without a unit is seconds, as in ``sleep``.
"""

from __future__ import annotations

import math
import re

from tmem.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str) -> int:
    """Return ``value`` in bytes; raise :class:`ConfigError` if it is not a size."""
    if isinstance(value, bool):
        raise ConfigError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"size must not be negative: {value}")
        return value
    match = _SIZE_RE.match(value)
    if match is None:
        raise ConfigError(f"not a size: {value!r} (try 64MiB, 1G, 4096)")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ConfigError(f"unknown size unit {unit!r} in {value!r}")
    return int(float(number) * factor)


_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?|[-+]?\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_duration(value: float | str) -> float:
    """Return ``value`` in seconds (``30s``, ``500ms``, ``2m``, ``1h``, or a number of
    seconds); raise :class:`ConfigError` if it is not a duration or is negative."""
    if isinstance(value, bool):
        raise ConfigError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(value)
        if match is None:
            raise ConfigError(f"not a duration: {value!r} (try 30s, 500ms, 2m, 1h)")
        number, unit = match.groups()
        factor = _DURATION_UNITS.get(unit.lower())
        if factor is None:
            raise ConfigError(f"unknown duration unit {unit!r} in {value!r} (ms, s, m or h)")
        seconds = float(number) * factor
    if not math.isfinite(seconds):
        raise ConfigError(f"not a duration: {value!r}")
    if seconds < 0:
        raise ConfigError(f"duration must not be negative: {value!r}")
    return seconds


def format_size(nbytes: float) -> str:
    """Format a byte count with a binary suffix, e.g. ``1.5 MiB``."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - loop always returns
