"""Handshake: two Connections authenticate each other over the wire framing; every
way of failing ends the connection with the documented reason and admits no data."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from typing import Any

import pytest

from tmem.ramster.handshake import Handshake, compute_proof
from tmem.ramster.wire import (
    HEADER_SIZE,
    NEED_DATA,
    Authenticated,
    Connection,
    HandshakeFailed,
    Hello,
    LocalProtocolError,
    PageKey,
    Ping,
    Pong,
    Proof,
    ProtocolError,
    Put,
    decode_frame,
    encode,
)

KEY = PageKey(1, 0, True, (1, 2, 3), 4)


def hs(node: int, **over: Any) -> Handshake:
    kw: dict[str, Any] = {
        "cluster": "lab",
        "secret": b"s3cret",
        "node": node,
        "name": f"n{node}",
        "compressor": "lz4",
        "known_nodes": {1, 2, 3},
    }
    kw.update(over)
    return Handshake(**kw)


def drain(conn: Connection) -> list[object]:
    out: list[object] = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def pump(a: Connection, b: Connection) -> tuple[list[object], list[object]]:
    """Shuttle queued bytes both ways until both sides are quiet."""
    ea: list[object] = []
    eb: list[object] = []
    for _ in range(10):
        x, y = a.data_to_send(), b.data_to_send()
        if not x and not y:
            break
        if x:
            b.receive_data(x)
        if y:
            a.receive_data(y)
        ea += drain(a)
        eb += drain(b)
    return ea, eb


def pair(**over_b: Any) -> tuple[Connection, Connection, list[object], list[object]]:
    a = Connection(handshake=hs(2, initiator=True, expected_peer=1))
    over_b.setdefault("initiator", False)
    b = Connection(handshake=hs(1, **over_b))
    ea, eb = pump(a, b)
    return a, b, ea, eb


def test_success_then_data_flows_both_ways() -> None:
    a, b, ea, eb = pair()
    assert ea == [Authenticated(1, "n1", "lz4")]
    assert eb == [Authenticated(2, "n2", "lz4")]
    assert a.authenticated and b.authenticated
    assert a.peer == Authenticated(1, "n1", "lz4") and b.peer == Authenticated(2, "n2", "lz4")
    b.receive_data(a.send(Put(key=KEY, data=b"page", cookie=9)))
    (put,) = drain(b)
    assert isinstance(put, Put) and bytes(put.data) == b"page" and put.cookie == 9
    a.receive_data(b.send(Pong(cookie=9)))
    assert drain(a) == [Pong(cookie=9)]


def test_data_in_the_same_segment_as_the_proof_is_accepted() -> None:
    a = Connection(handshake=hs(2, initiator=True))
    b = Connection(handshake=hs(1, initiator=False))
    b.receive_data(a.data_to_send())  # a's HELLO -> b queues HELLO + PROOF
    a.receive_data(b.data_to_send())  # -> a authenticated, queues its PROOF
    assert drain(a) == [Authenticated(1, "n1", "lz4")]
    b.receive_data(a.data_to_send() + a.send(Ping(cookie=1)))
    assert drain(b) == [Authenticated(2, "n2", "lz4"), Ping(cookie=1)]


def _fails(events: list[object], reason: str) -> None:
    assert events, "expected a HandshakeFailed"
    assert isinstance(events[-1], HandshakeFailed), events
    assert events[-1].reason == reason, events[-1]
    assert not any(isinstance(e, Authenticated) for e in events)


def test_wrong_secret_fails_on_both_sides() -> None:
    a, b, ea, eb = pair(secret=b"other")
    _fails(ea, "bad-proof")
    _fails(eb, "bad-proof")
    assert a.closed and b.closed and not a.authenticated and not b.authenticated


def test_wrong_cluster() -> None:
    a, b, _, eb = pair(cluster="prod")
    _fails(eb, "cluster")
    assert b.closed and not a.authenticated


def test_unknown_node_by_set_and_by_callback() -> None:
    _, _, _, eb = pair(known_nodes={1, 3})
    _fails(eb, "unknown-node")
    seen: list[tuple[int, str]] = []

    def admit(num: int, name: str) -> bool:
        seen.append((num, name))
        return name == "n3"

    _, _, _, eb = pair(known_nodes=admit)
    _fails(eb, "unknown-node")
    assert seen == [(2, "n2")]


def test_initiator_refuses_a_different_node_than_dialled() -> None:
    a = Connection(handshake=hs(2, initiator=True, expected_peer=3))
    b = Connection(handshake=hs(1, initiator=False))
    ea, _ = pump(a, b)
    _fails(ea, "unknown-node")


def test_own_node_number_is_refused() -> None:
    a = Connection(handshake=hs(1, initiator=True))
    b = Connection(handshake=hs(1, initiator=False))
    ea, eb = pump(a, b)
    _fails(ea, "unknown-node")
    _fails(eb, "unknown-node")


def test_compressor_mismatch() -> None:
    _, _, _, eb = pair(compressor="zstd")
    _fails(eb, "compressor")


def test_both_initiators_is_a_role_failure() -> None:
    _, _, _, eb = pair(initiator=True)
    _fails(eb, "role")


def _raw_frame(mtype: int, payload: bytes, version: int) -> bytes:
    hdr = struct.pack(">HBBHHQiI", 0x7734, version, mtype, 0, 0, 0, 0, len(payload))
    return hdr + struct.pack(">I", zlib.crc32(payload, zlib.crc32(hdr))) + payload


def test_version_mismatch_in_header_and_in_hello() -> None:
    good = encode(hs(2, initiator=True).hello())
    future = _raw_frame(1, good[HEADER_SIZE:], version=2)
    b = Connection(handshake=hs(1, initiator=False))
    b.receive_data(future)
    _fails(drain(b), "version")
    old = hs(2, initiator=True).hello()
    hello_v0 = Hello(
        version=0,
        initiator=True,
        node=old.node,
        nonce=old.nonce,
        cluster=old.cluster,
        name=old.name,
        compressor=old.compressor,
    )
    b = Connection(handshake=hs(1, initiator=False))
    b.receive_data(encode(hello_v0))
    _fails(drain(b), "version")


def test_data_message_before_authentication_is_a_protocol_error() -> None:
    b = Connection(handshake=hs(1, initiator=False))
    b.receive_data(encode(Put(key=KEY, data=b"sneaky")))
    (err,) = drain(b)
    assert isinstance(err, ProtocolError) and err.reason == "unauthenticated"
    assert b.closed
    # also after a valid HELLO, before the PROOF
    a_hs = hs(2, initiator=True)
    b = Connection(handshake=hs(1, initiator=False))
    b.receive_data(encode(a_hs.hello()) + encode(Put(key=KEY, data=b"sneaky")))
    (err,) = drain(b)
    assert isinstance(err, ProtocolError) and err.reason == "unauthenticated"


def test_local_send_before_authentication_raises() -> None:
    a = Connection(handshake=hs(2, initiator=True))
    with pytest.raises(LocalProtocolError):
        a.send(Ping())


def test_oversized_frame_before_authentication() -> None:
    b = Connection(handshake=hs(1, initiator=False))
    b.receive_data(_raw_frame(1, b"\0" * 2000, version=1)[:HEADER_SIZE])
    (err,) = drain(b)
    assert isinstance(err, ProtocolError) and err.reason == "oversized"


@pytest.mark.parametrize(
    "frames",
    [
        lambda h: [encode(Proof(mac=b"\0" * 32))],  # proof before hello
        lambda h: [encode(h.hello()), encode(h.hello())],  # second hello
    ],
)
def test_out_of_order_handshake_frames(frames: Callable[[Handshake], list[bytes]]) -> None:
    b = Connection(handshake=hs(1, initiator=False))
    b.receive_data(b"".join(frames(hs(2, initiator=True))))
    (err,) = drain(b)
    assert isinstance(err, ProtocolError) and err.reason == "unexpected"


def test_handshake_frame_after_authentication_is_unexpected() -> None:
    _, b, _, _ = pair()
    b.receive_data(encode(hs(2, initiator=True).hello()))
    (err,) = drain(b)
    assert isinstance(err, ProtocolError) and err.reason == "unexpected"


def test_reflected_hello_is_refused() -> None:
    """An attacker bouncing the acceptor's own HELLO back (as initiator) gets nowhere."""
    b = Connection(handshake=hs(1, initiator=False))
    # decode b's HELLO, flip the role and the node number to a known one, send it back
    theirs = decode_frame(b.data_to_send())
    assert isinstance(theirs, Hello)
    echoed = Hello(
        version=theirs.version,
        initiator=True,
        node=2,
        nonce=theirs.nonce,
        cluster=theirs.cluster,
        name="n2",
        compressor=theirs.compressor,
    )
    b.receive_data(encode(echoed))
    _fails(drain(b), "reflected-nonce")


def test_replayed_session_is_refused() -> None:
    """Recording a legitimate initiator's HELLO + PROOF does not open a new session:
    the acceptor's fresh nonce changes the proof it expects."""
    a = Connection(handshake=hs(2, initiator=True))
    b = Connection(handshake=hs(1, initiator=False))
    recorded = [a.data_to_send()]
    b.receive_data(recorded[0])
    a.receive_data(b.data_to_send())
    recorded.append(a.data_to_send())  # a's PROOF for this session
    b.receive_data(recorded[1])
    assert drain(b) == [Authenticated(2, "n2", "lz4")]

    b2 = Connection(handshake=hs(1, initiator=False))
    b2.receive_data(recorded[0] + recorded[1])
    _fails(drain(b2), "bad-proof")


def test_a_proof_is_bound_to_its_role() -> None:
    """The acceptor's own proof, sent back as the initiator's, does not verify."""
    ih = hs(2, initiator=True, nonce=b"i" * 32)
    ah = hs(1, initiator=False, nonce=b"a" * 32)
    acc_proof = compute_proof(b"s3cret", False, ih.hello(), ah.hello())
    ini_proof = compute_proof(b"s3cret", True, ih.hello(), ah.hello())
    assert acc_proof != ini_proof
    b = Connection(handshake=hs(1, initiator=False, nonce=b"a" * 32))
    b.receive_data(encode(ih.hello()) + encode(Proof(mac=acc_proof)))
    _fails(drain(b), "bad-proof")
    b = Connection(handshake=hs(1, initiator=False, nonce=b"a" * 32))
    b.receive_data(encode(ih.hello()) + encode(Proof(mac=ini_proof)))
    assert drain(b) == [Authenticated(2, "n2", "lz4")]


def test_bad_handshake_parameters() -> None:
    with pytest.raises(LocalProtocolError):
        hs(1, initiator=True, secret=b"")
    with pytest.raises(LocalProtocolError):
        hs(1, initiator=True, nonce=b"short")
    with pytest.raises(LocalProtocolError):
        Connection(handshake=hs(1, initiator=True, name="x" * 300))
