"""tmem: transcendent memory in Python.

A compressed in-RAM page store (zcache with the zbud allocator) behind the tmem
put/get/flush interface, with cleancache and frontswap front ends. The cluster
layer (``tmem.ramster``) and the NBD server (``tmem.nbd``) are optional and are
never imported from here.
"""

from __future__ import annotations

from tmem.compress import COMPRESSORS, PAGE_SIZE
from tmem.errors import (
    ConfigError,
    InvalidHandleError,
    PageSizeError,
    PoolLimitError,
    RemotePageError,
    TmemError,
    UnknownPoolError,
)
from tmem.frontends import Cleancache, Frontswap
from tmem.sizes import format_size, parse_size
from tmem.zcache import LOCAL_CLIENT, Oid, PutResult, Zcache, ZombiePage

__version__ = "0.1.0"

__all__ = [
    "COMPRESSORS",
    "LOCAL_CLIENT",
    "PAGE_SIZE",
    "Cleancache",
    "ConfigError",
    "Frontswap",
    "InvalidHandleError",
    "Oid",
    "PageSizeError",
    "PoolLimitError",
    "PutResult",
    "RemotePageError",
    "TmemError",
    "UnknownPoolError",
    "Zcache",
    "ZombiePage",
    "__version__",
    "format_size",
    "parse_size",
]
