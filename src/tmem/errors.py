"""Exceptions raised by tmem.

Every error a caller can cause is a :class:`TmemError`, so one ``except`` clause
catches them all; subclasses also derive from the matching builtin so that code
written against plain Python conventions (``except ValueError``) keeps working.
"""

from __future__ import annotations


class TmemError(Exception):
    """Base class of every error tmem raises on bad input or a refused operation."""


class PageSizeError(TmemError, ValueError):
    """A page that is not exactly PAGE_SIZE bytes."""


class InvalidHandleError(TmemError, ValueError):
    """An oid or page index out of range (oid words are u64, index is u32)."""


class UnknownPoolError(TmemError, KeyError):
    """A pool id that does not name a live pool."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "unknown pool"


class PoolLimitError(TmemError):
    """No free pool slot (16 pools per client, as in the kernel)."""


class ConfigError(TmemError, ValueError):
    """A bad configuration value (size, compressor name, option)."""


class RemotePageError(TmemError):
    """The page lives on another node; only the cluster layer can fetch it."""

    def __init__(self, pampd: object) -> None:
        super().__init__(f"page is remote: {pampd!r}")
        self.pampd = pampd
