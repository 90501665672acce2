"""NBD front end: a tmem-backed block device that unmodified NBD clients use.

``tmem.nbd.protocol`` is the sans-IO protocol (bytes in, events out); the asyncio
server, the block device and the CLI are thin layers on top of it.
"""

from __future__ import annotations

from tmem.nbd.protocol import (
    NEED_DATA,
    Command,
    ConnectionClosed,
    Disconnect,
    ExportInfo,
    ExportSelected,
    ProtocolError,
    Request,
    RequestRejected,
    ServerConnection,
    State,
)

__all__ = [
    "NEED_DATA",
    "Command",
    "ConnectionClosed",
    "Disconnect",
    "ExportInfo",
    "ExportSelected",
    "ProtocolError",
    "Request",
    "RequestRejected",
    "ServerConnection",
    "State",
]
