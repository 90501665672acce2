"""Opt-in metadata contexts (base:allocation) and NBD_CMD_BLOCK_STATUS, byte by byte."""

from __future__ import annotations

import struct

import pytest

from test_nbd_protocol_client import (
    CHUNK_ERROR,
    ERR,
    FUA,
    OPT_GO,
    OPT_SR,
    READ,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REQ_ONE,
    Client,
    go_data,
    option,
    request,
)
from tmem.nbd.protocol import (
    EINVAL,
    STATE_HOLE,
    STATE_ZERO,
    Command,
    ExportInfo,
    ExportSelected,
    LocalProtocolError,
    Request,
    RequestRejected,
    ServerConnection,
)

OPT_LIST_META, OPT_SET_META = 9, 10
REP_META_CONTEXT = 4
BLOCK_STATUS = 7
CHUNK_BLOCK_STATUS = 5
SIZE = 1 << 20


def meta_data(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def make(block_status: bool = True) -> Client:
    exports = {"d": ExportInfo("d", SIZE), "e": ExportInfo("e", SIZE)}
    c = Client(ServerConnection(exports, "d", block_status=block_status))
    c.greeting()
    c.send(struct.pack(">I", 3))
    return c


def structured(block_status: bool = True) -> Client:
    c = make(block_status)
    c.send(option(OPT_SR))
    assert c.opt_reply().type == REP_ACK
    return c


def replies(c: Client) -> list[tuple[int, bytes]]:
    return [(r.type, r.data) for r in c.opt_replies()]


def selected(c: Client, name: str = "") -> ExportSelected:
    (ev,) = c.send(option(OPT_GO, go_data(name)))
    c.opt_replies()
    assert isinstance(ev, ExportSelected)
    return ev


def test_disabled_by_default_meta_options_are_unsup() -> None:
    c = make(block_status=False)
    c.send(option(OPT_SR))
    c.opt_reply()
    for opt in (OPT_LIST_META, OPT_SET_META):
        c.send(option(opt, meta_data("d", "base:allocation")))
        assert c.opt_reply().type == REP_ERR_UNSUP
    assert not selected(c).meta_context


def test_list_meta_context() -> None:
    c = structured()
    for queries in ((), ("base:",), ("base:allocation",), ("x:y", "base:allocation")):
        c.send(option(OPT_LIST_META, meta_data("d", *queries)))
        assert replies(c) == [
            (REP_META_CONTEXT, struct.pack(">I", 0) + b"base:allocation"),
            (REP_ACK, b""),
        ]
    c.send(option(OPT_LIST_META, meta_data("d", "qemu:dirty-bitmap:x", "base:nope")))
    assert replies(c) == [(REP_ACK, b"")]


def test_set_meta_context_then_block_status() -> None:
    c = structured()
    c.send(option(OPT_SET_META, meta_data("", "x:y", "base:allocation")))
    assert replies(c) == [
        (REP_META_CONTEXT, struct.pack(">I", 1) + b"base:allocation"),
        (REP_ACK, b""),
    ]
    sel = selected(c, "d")  # "" and "d" are the same export
    assert sel.meta_context and c.conn.meta_context
    (req,) = c.send(request(BLOCK_STATUS, 5, 4096, 65536, FUA))
    assert isinstance(req, Request) and req.command is Command.BLOCK_STATUS
    c.rx += b"".join(
        c.conn.reply_block_status(
            req, [(8192, 0), (16384, STATE_HOLE | STATE_ZERO), (1 << 20, STATE_ZERO)]
        )
    )
    ch = c.chunk()
    assert (ch.flags, ch.type, ch.cookie) == (1, CHUNK_BLOCK_STATUS, 5)
    # trimmed to the request: 8192 + 16384 + 40960 == 65536
    assert ch.payload == struct.pack(">IIIIIII", 1, 8192, 0, 16384, 3, 40960, 2)
    assert c.conn.in_flight == 0


def test_req_one_sends_one_descriptor_and_plain_reply_reports_status_0() -> None:
    c = structured()
    c.send(option(OPT_SET_META, meta_data("d", "base:allocation")))
    c.opt_replies()
    selected(c)
    (req,) = c.send(request(BLOCK_STATUS, 6, 0, 4096, REQ_ONE))
    assert isinstance(req, Request)
    c.rx += b"".join(c.conn.reply_block_status(req, [(8192, 3), (4096, 0)]))
    assert c.chunk().payload == struct.pack(">III", 1, 4096, 3)
    (req,) = c.send(request(BLOCK_STATUS, 7, 0, 12288))
    assert isinstance(req, Request)
    c.rx += c.conn.reply(req)
    assert c.chunk().payload == struct.pack(">III", 1, 12288, 0)
    (req,) = c.send(request(BLOCK_STATUS, 8, 0, 512))
    assert isinstance(req, Request)
    c.rx += c.conn.reply(req, error=EINVAL, message="nope")
    assert c.chunk().type == CHUNK_ERROR
    with pytest.raises(LocalProtocolError):
        c.conn.reply_block_status(req, [])
    with pytest.raises(LocalProtocolError):
        c.conn.reply_block_status(req, [(0, 0)])
    (rd,) = c.send(request(READ, 9, 0, 512))
    assert isinstance(rd, Request)
    with pytest.raises(LocalProtocolError):
        c.conn.reply_block_status(rd, [(512, 0)])


@pytest.mark.parametrize(
    ("offset", "length", "flags"),
    [(SIZE - 512, 1024, 0), (0, 0, 0), (0, 512, 2), (0, 512, 4), (0, 512, 16), (0, 512, 1 << 9)],
)
def test_invalid_block_status_requests(offset: int, length: int, flags: int) -> None:
    c = structured()
    c.send(option(OPT_SET_META, meta_data("d", "base:allocation")))
    c.opt_replies()
    selected(c)
    (ev,) = c.send(request(BLOCK_STATUS, 3, offset, length, flags))
    assert isinstance(ev, RequestRejected) and ev.error == EINVAL
    ch = c.chunk()
    assert ch.type == CHUNK_ERROR and ch.cookie == 3


def test_block_status_needs_the_context_set_for_the_chosen_export() -> None:
    c = structured()
    c.send(option(OPT_SET_META, meta_data("e", "base:allocation")))
    c.opt_replies()
    assert not selected(c, "d").meta_context
    (ev,) = c.send(request(BLOCK_STATUS, 1, 0, 512))
    assert isinstance(ev, RequestRejected) and ev.error == EINVAL


def test_a_later_set_replaces_the_selection() -> None:
    c = structured()
    c.send(option(OPT_SET_META, meta_data("d", "base:allocation")))
    c.opt_replies()
    c.send(option(OPT_SET_META, meta_data("d")))  # zero queries: select nothing
    assert replies(c) == [(REP_ACK, b"")]
    assert not selected(c).meta_context


def test_set_without_structured_replies_is_invalid() -> None:
    c = make()
    c.send(option(OPT_SET_META, meta_data("d", "base:allocation")))
    assert c.opt_reply().type == REP_ERR_INVALID
    assert not selected(c).meta_context


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 7,
        struct.pack(">I", 9) + b"d" + struct.pack(">I", 0),
        meta_data("d", "base:allocation")[:-1],
        meta_data("d", "base:allocation") + b"x",
        meta_data("d")[:-4] + struct.pack(">I", 1000),
        meta_data("d")[:-4] + struct.pack(">I", 1) + struct.pack(">I", 50) + b"base:",
        meta_data("d", "base:\x00"),
        struct.pack(">I", 1) + b"\xff" + struct.pack(">I", 0),
    ],
)
@pytest.mark.parametrize("opt", [OPT_LIST_META, OPT_SET_META])
def test_malformed_meta_requests_are_invalid(opt: int, data: bytes) -> None:
    c = structured()
    c.send(option(opt, data))
    (r,) = c.opt_replies()
    assert r.type == REP_ERR_INVALID
    assert r.type & ERR


def test_meta_request_for_unknown_export() -> None:
    c = structured()
    c.send(option(OPT_SET_META, meta_data("zz", "base:allocation")))
    assert c.opt_reply().type == REP_ERR_UNKNOWN
