"""Sans-IO mutual authentication of two RAMster nodes over the wire framing.

r2net's handshake only compared version numbers and timeouts: anyone who could
reach the port could store or read pages. Here both ends prove knowledge of the
cluster secret before a single data message is accepted:

1. Each side sends HELLO {version, role, node number, 32-byte random nonce,
   cluster name, node name, compressor} as soon as the connection exists
   (the :class:`~tmem.ramster.wire.Connection` constructor queues it).
2. On the peer's HELLO, a side checks version, cluster name, role (exactly one
   initiator), its own nonce not reflected, node number known (and the expected
   one, for the initiator) and compressor, then answers PROOF =
   HMAC-SHA256(secret, transcript(own role)).
3. On the peer's PROOF it recomputes transcript(peer role) and compares with
   :func:`hmac.compare_digest`. Success -> ``Authenticated``; the Connection
   starts accepting data messages.

The transcript is ``b"tmem-ramster" + role + nonce_initiator + nonce_acceptor +
node_initiator + node_acceptor + len-prefixed cluster, initiator/acceptor names,
compressor``; the role makes a proof useless in the other direction and the
fresh nonces make a recorded proof useless on another connection (replay).

Any failure is a :class:`~tmem.ramster.wire.HandshakeFailed` with one of the
reasons ``version``, ``cluster``, ``role``, ``reflected-nonce``,
``unknown-node``, ``compressor``, ``bad-proof``; the Connection then closes and
the caller drops the socket and counts it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable, Container
from typing import Final

from tmem.ramster.wire import (
    PROTOCOL_VERSION,
    Authenticated,
    HandshakeFailed,
    Hello,
    LocalProtocolError,
    Message,
    Proof,
    ProtocolError,
)

__all__ = ["DOMAIN", "Handshake", "KnownNodes", "compute_proof"]

DOMAIN: Final = b"tmem-ramster"
_ROLE = {True: b"initiator", False: b"acceptor"}

KnownNodes = Container[int] | Callable[[int, str], bool]
"""Which peers may join: a set of node numbers, or ``f(number, name) -> bool``."""


def _lp(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def compute_proof(
    secret: bytes, prover_initiator: bool, initiator: Hello, acceptor: Hello
) -> bytes:
    """HMAC-SHA256 that the side with role ``prover_initiator`` sends."""
    transcript = b"".join(
        (
            DOMAIN,
            _ROLE[prover_initiator],
            initiator.nonce,
            acceptor.nonce,
            struct.pack(">HH", initiator.node, acceptor.node),
            _lp(initiator.cluster),
            _lp(initiator.name),
            _lp(acceptor.name),
            _lp(initiator.compressor),
        )
    )
    return hmac.new(secret, transcript, hashlib.sha256).digest()


class Handshake:
    """One side's handshake state. Pass it to ``Connection(handshake=...)``.

    ``initiator`` is True on the side that connected (it usually also knows
    ``expected_peer``, the node number it dialled). ``known_nodes`` decides which
    peers are admitted. ``nonce`` is only for tests (default: os.urandom(32)).
    """

    def __init__(
        self,
        *,
        cluster: str,
        secret: bytes | str,
        node: int,
        name: str,
        compressor: str,
        initiator: bool,
        known_nodes: KnownNodes,
        expected_peer: int | None = None,
        nonce: bytes | None = None,
    ) -> None:
        secret_b = secret.encode() if isinstance(secret, str) else bytes(secret)
        if not secret_b:
            raise LocalProtocolError("the cluster secret must not be empty")
        if nonce is not None and len(nonce) != 32:
            raise LocalProtocolError("nonce must be 32 bytes")
        self._secret = secret_b
        self.initiator = initiator
        self.known_nodes = known_nodes
        self.expected_peer = expected_peer
        self._hello = Hello(
            version=PROTOCOL_VERSION,
            initiator=initiator,
            node=node,
            nonce=nonce if nonce is not None else os.urandom(32),
            cluster=cluster,
            name=name,
            compressor=compressor,
        )
        self.peer: Hello | None = None
        self.done = False

    def hello(self) -> Hello:
        """Our HELLO (sent first, by the Connection)."""
        return self._hello

    def _known(self, node: int, name: str) -> bool:
        known = self.known_nodes
        if callable(known):
            return bool(known(node, name))
        return node in known

    def _pair(self) -> tuple[Hello, Hello]:
        assert self.peer is not None
        if self.initiator:
            return self._hello, self.peer
        return self.peer, self._hello

    def receive(self, msg: Message) -> Proof | Authenticated | HandshakeFailed | ProtocolError:
        """Feed the peer's HELLO or PROOF; returns what to send or the outcome."""
        if self.done:
            return ProtocolError("unexpected", "handshake message after the handshake")
        if isinstance(msg, Hello):
            if self.peer is not None:
                return ProtocolError("unexpected", "second HELLO")
            return self._on_hello(msg)
        if isinstance(msg, Proof):
            if self.peer is None:
                return ProtocolError("unexpected", "PROOF before HELLO")
            return self._on_proof(msg)
        return ProtocolError("unexpected", f"{type(msg).__name__} during the handshake")

    def _on_hello(self, h: Hello) -> Proof | HandshakeFailed:
        me = self._hello
        if h.version != PROTOCOL_VERSION:
            return HandshakeFailed("version", f"peer version {h.version}, ours {PROTOCOL_VERSION}")
        if h.cluster != me.cluster:
            return HandshakeFailed("cluster", f"peer cluster {h.cluster!r}, ours {me.cluster!r}")
        if h.initiator == me.initiator:
            role = _ROLE[me.initiator].decode()
            return HandshakeFailed("role", f"both sides claim to be the {role}")
        if hmac.compare_digest(h.nonce, me.nonce):
            return HandshakeFailed("reflected-nonce", "peer echoed our nonce")
        if h.node == me.node:
            return HandshakeFailed("unknown-node", f"peer claims our own node number {h.node}")
        if self.expected_peer is not None and h.node != self.expected_peer:
            return HandshakeFailed(
                "unknown-node", f"dialled node {self.expected_peer}, peer is node {h.node}"
            )
        if not self._known(h.node, h.name):
            return HandshakeFailed(
                "unknown-node", f"node {h.node} ({h.name!r}) is not in the cluster"
            )
        if h.compressor != me.compressor:
            return HandshakeFailed(
                "compressor", f"peer compresses with {h.compressor!r}, we with {me.compressor!r}"
            )
        self.peer = h
        ini, acc = self._pair()
        return Proof(mac=compute_proof(self._secret, self.initiator, ini, acc))

    def _on_proof(self, p: Proof) -> Authenticated | HandshakeFailed:
        ini, acc = self._pair()
        want = compute_proof(self._secret, not self.initiator, ini, acc)
        if not hmac.compare_digest(want, p.mac):
            return HandshakeFailed("bad-proof", "peer does not know the cluster secret")
        self.done = True
        assert self.peer is not None
        return Authenticated(self.peer.node, self.peer.name, self.peer.compressor)
