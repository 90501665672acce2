"""Property tests of the sans-IO NBD server: random bytes, random splits, mutated streams.

Invariants checked everywhere: next_event() raises nothing (the only failure is the
documented ProtocolError event), the receive buffer never holds more than one message
(header + limit) whatever the length fields say, the state is consistent with the
events, and every request or rejection gets exactly one well-formed reply.
"""

from __future__ import annotations

import struct
import tracemalloc
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from test_nbd_protocol_client import (
    CHUNK_DATA,
    CHUNK_ERROR,
    CHUNK_NONE,
    DF,
    DISC,
    FLUSH,
    FUA,
    IHAVEOPT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_SR,
    READ,
    REP_ACK,
    REQ_ONE,
    TRIM,
    WRITE,
    WRITE_ZEROES,
    Client,
    go_data,
    option,
    request,
)
from tmem.nbd.protocol import (
    EINVAL,
    ENOSPC,
    EOVERFLOW,
    EPERM,
    NEED_DATA,
    Command,
    ConnectionClosed,
    Disconnect,
    Event,
    ExportInfo,
    ExportSelected,
    NeedData,
    ProtocolError,
    Request,
    RequestRejected,
    ServerConnection,
    State,
)

SIZE = 64 * 1024
BLOCK_STATUS = 7
MAXP = 16 * 1024
MAX_OPT = 4 + 4096 + 2 + 8
BOUND = max(16 + MAX_OPT, 28 + MAXP)  # one incomplete message, at most
TERMINAL = (Disconnect, ConnectionClosed, ProtocolError)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def new_conn(read_only: bool = False) -> ServerConnection:
    exports = {"d": ExportInfo("d", SIZE, read_only=read_only, max_payload=MAXP)}
    return ServerConnection(
        exports, "d", max_payload=MAXP, max_option_length=MAX_OPT, block_status=True
    )


@dataclass
class Run:
    """Feeds a connection chunk by chunk like a well-behaved shell and checks invariants."""

    conn: ServerConnection
    out: bytearray
    events: list[Event]

    @classmethod
    def start(cls, conn: ServerConnection) -> Run:
        return cls(conn, bytearray(conn.initial_bytes()), [])

    def feed(self, chunk: bytes) -> None:
        self.conn.receive_data(chunk)
        self.drain()

    def drain(self) -> None:
        conn = self.conn
        while True:
            ev = conn.next_event()  # must never raise
            self.out += conn.data_to_send()
            if isinstance(ev, NeedData):
                assert ev is NEED_DATA
                assert conn.buffered <= BOUND, conn.buffered
                assert conn.state not in (State.ERROR, State.CLOSED, State.DISCONNECTED)
                return
            self.check_event(ev)
            self.events.append(ev)
            if isinstance(ev, TERMINAL):
                assert conn.next_event() is ev
                assert conn.buffered == 0
                return
            if isinstance(ev, Request):
                self.answer(ev)

    def check_event(self, ev: Event) -> None:
        conn = self.conn
        assert isinstance(ev, (ExportSelected, Request, RequestRejected, *TERMINAL))
        if isinstance(ev, ProtocolError):
            assert conn.state is State.ERROR
        elif isinstance(ev, ConnectionClosed):
            assert conn.state is State.CLOSED
        elif isinstance(ev, Disconnect):
            assert conn.state is State.DISCONNECTED
        elif isinstance(ev, ExportSelected):
            assert conn.state is State.TRANSMISSION and conn.export is ev.info
            assert not any(isinstance(e, ExportSelected) for e in self.events)
        else:
            assert conn.state is State.TRANSMISSION
        if isinstance(ev, Request):
            assert ev.offset + ev.length <= SIZE
            if ev.command is Command.WRITE:
                assert ev.payload is not None and len(ev.payload) == ev.length <= MAXP
            else:
                assert ev.payload is None
            if ev.command is Command.READ:
                assert ev.length <= MAXP
            allowed = FUA | (DF if ev.command is Command.READ and conn.structured else 0)
            if ev.command is Command.WRITE_ZEROES:
                allowed |= 2 | 16
            if ev.command is Command.BLOCK_STATUS:
                assert conn.meta_context and ev.length > 0
                allowed |= REQ_ONE
            assert int(ev.flags) & ~allowed == 0
        if isinstance(ev, RequestRejected):
            assert ev.error in (EINVAL, ENOSPC, EOVERFLOW, EPERM)

    def answer(self, req: Request) -> None:
        data = bytes(req.length) if req.command is Command.READ else None
        for part in self.conn.reply_parts(req, 0, data):
            self.out += part


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, prev = [], 0
    for p in [*points, len(data)]:
        if p > prev:
            chunks.append(data[prev:p])
            prev = p
    return chunks


# ---------------------------------------------------------------- request oracle


def expected_error(
    cmd: int,
    flags: int,
    offset: int,
    length: int,
    *,
    structured: bool,
    read_only: bool,
    meta: bool = False,
) -> int | str:
    """The spec's answer, written independently of the implementation."""
    if cmd == DISC:
        return "disc"
    if cmd == WRITE and length > max(MAXP, 1 << 25):
        return "drop"
    if cmd not in (0, 1, 3, 4, 5, 6) and not (cmd == BLOCK_STATUS and meta):
        return EINVAL
    allowed = FUA
    if cmd == BLOCK_STATUS:
        allowed |= REQ_ONE
    if cmd == READ and structured:
        allowed |= DF
    if cmd == WRITE_ZEROES:
        allowed |= 2 | 16
    if flags & ~allowed:
        return EINVAL
    if cmd == FLUSH:
        return EINVAL if offset or length else 0
    if cmd == BLOCK_STATUS and length == 0:
        return EINVAL
    if read_only and cmd in (WRITE, TRIM, WRITE_ZEROES):
        return EPERM
    if cmd in (READ, WRITE) and length > MAXP:
        return EOVERFLOW if cmd == READ and flags & DF else EINVAL
    if offset + length > SIZE:
        return ENOSPC if cmd in (WRITE, WRITE_ZEROES) else EINVAL
    return 0


@st.composite
def requests(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    cmd = draw(st.sampled_from([0, 0, 1, 1, 1, 3, 4, 5, 6, 6, 7, 8, 42]))
    flags = draw(st.sampled_from([0, 0, 0, FUA, DF, 2, 16, 2 | 16 | FUA, 8, 32, 0x8000]))
    offset = draw(
        st.one_of(
            st.integers(0, SIZE // 512).map(lambda b: b * 512),
            st.integers(0, SIZE + 1024),
            st.sampled_from([0, SIZE, 1 << 63, (1 << 64) - 1]),
        )
    )
    if cmd == FLUSH and draw(st.booleans()):
        offset = 0
    length = draw(
        st.one_of(
            st.sampled_from([0, 512, 4096, MAXP, MAXP + 512]),
            st.integers(0, MAXP + 4096),
        )
    )
    if cmd == FLUSH and draw(st.booleans()):
        length = 0
    cookie = draw(st.integers(0, (1 << 64) - 1))
    return cmd, flags, offset, length, cookie


@dataclass
class Session:
    stream: bytes
    structured: bool
    read_only: bool
    go: bool
    no_zeroes: bool
    meta: bool
    reqs: list[tuple[int, int, int, int, int]]


@st.composite
def sessions(draw: st.DrawFn) -> Session:
    """A client byte stream: handshake (GO or EXPORT_NAME), junk options, requests."""
    structured = draw(st.booleans())
    read_only = draw(st.booleans())
    no_zeroes = draw(st.booleans())
    stream = struct.pack(">I", 1 | (2 if no_zeroes else 0))
    for opt in draw(st.lists(st.sampled_from([3, 5, 6, 9, 99, 0xFFFFFFFF]), max_size=4)):
        data = go_data(draw(st.sampled_from(["", "d", "x"]))) if opt == 6 else b""
        stream += option(opt, data)
    meta = False
    if structured:
        stream += option(OPT_SR)
        if draw(st.booleans()):
            # select base:allocation for "d" (or, when the query misses, select nothing)
            query = draw(st.sampled_from(["base:allocation", "base:allocation", "base:x"]))
            raw = struct.pack(">I", 1) + b"d" + struct.pack(">II", 1, len(query)) + query.encode()
            stream += option(10, raw)
            meta = query == "base:allocation"
    go = draw(st.booleans())
    if go:
        stream += option(OPT_GO, go_data(draw(st.sampled_from(["", "d"])), (3,)))
    else:
        stream += option(OPT_EXPORT_NAME, b"d")
    reqs = draw(st.lists(requests(), max_size=25))
    for cmd, flags, offset, length, cookie in reqs:
        payload = bytes([cookie & 0xFF]) * length if cmd == WRITE else b""
        stream += request(cmd, cookie, offset, length, flags, payload)
    return Session(stream, structured, read_only, go, no_zeroes, meta, reqs)


# ---------------------------------------------------------------- properties


@FAST
@given(
    prefix=st.sampled_from(["none", "flags", "transmission", "structured"]),
    junk=st.binary(max_size=3000),
    cuts=st.lists(st.integers(0, 4000), max_size=12),
)
def test_random_bytes_never_raise(prefix: str, junk: bytes, cuts: list[int]) -> None:
    c = Client(new_conn())
    if prefix != "none":
        c.greeting()
        c.send(struct.pack(">I", 3))
    if prefix in ("transmission", "structured"):
        evs = c.send(
            (option(OPT_SR) if prefix == "structured" else b"") + option(OPT_GO, go_data("d"))
        )
        assert isinstance(evs[0], ExportSelected)
    run = Run(c.conn, bytearray(), [])
    for chunk in split(junk, cuts):
        run.feed(chunk)
        if run.events and isinstance(run.events[-1], TERMINAL):
            break
    run.conn.receive_data(b"")
    run.drain()
    assert isinstance(run.events[-1], TERMINAL)


@FAST
@given(session=sessions(), cuts=st.lists(st.integers(0, 1 << 20), max_size=20))
def test_any_split_gives_the_same_events_and_bytes(session: Session, cuts: list[int]) -> None:
    stream, read_only = session.stream, session.read_only
    whole = Run.start(new_conn(read_only))
    whole.feed(stream)
    pieces = Run.start(new_conn(read_only))
    for chunk in split(stream, cuts):
        pieces.feed(chunk)
    assert pieces.events == whole.events
    assert pieces.out == whole.out
    bytewise = Run.start(new_conn(read_only))
    if len(stream) < 3000:
        for i in range(len(stream)):
            bytewise.feed(stream[i : i + 1])
        assert bytewise.events == whole.events
        assert bytewise.out == whole.out


@FAST
@given(session=sessions())
def test_requests_match_the_spec_oracle_and_replies_are_well_formed(session: Session) -> None:
    stream, structured, read_only, reqs = (
        session.stream,
        session.structured,
        session.read_only,
        session.reqs,
    )
    run = Run.start(new_conn(read_only))
    run.feed(stream)
    evs = run.events
    assert isinstance(evs[0], ExportSelected) and evs[0].structured == structured
    # parse the server's output with the independent test client
    c = Client.__new__(Client)
    c.rx = run.out
    c.greeting()
    while True:  # option replies until the export reply
        magic = struct.unpack_from(">Q", c.rx)[0] if len(c.rx) >= 8 else None
        if magic != 0x3E889045565A9:
            break
        r = c.opt_reply()
        if r.option == OPT_GO and r.type == REP_ACK:
            break
    if not session.go:
        pad = 0 if session.no_zeroes else 124
        size, _flags = struct.unpack(">QH", c.take(10))
        assert size == SIZE
        assert c.take(pad) == bytes(pad)
    rest = evs[1:]
    for (cmd, flags, offset, length, cookie), ev in zip(reqs, rest, strict=False):
        want = expected_error(
            cmd,
            flags,
            offset,
            length,
            structured=structured,
            read_only=read_only,
            meta=session.meta,
        )
        if want == "disc":
            assert ev == Disconnect("disc")
            break
        if want == "drop":
            assert isinstance(ev, ProtocolError)
            break
        if want == 0:
            assert isinstance(ev, Request) and ev.cookie == cookie
        else:
            assert isinstance(ev, RequestRejected) and (ev.error, ev.cookie) == (want, cookie)
        # exactly one well-formed reply with the cookie
        if structured and (want != 0 or cmd in (READ, BLOCK_STATUS)):
            ch = c.chunk()
            assert ch.cookie == cookie and ch.flags == 1
            if want:
                assert ch.type == CHUNK_ERROR
                assert struct.unpack_from(">I", ch.payload)[0] == want
            elif cmd == BLOCK_STATUS:  # Run.answer: one descriptor, status 0
                assert ch.type == 5 and ch.payload == struct.pack(">III", 1, length, 0)
            elif length:
                assert ch.type == CHUNK_DATA and ch.payload == struct.pack(">Q", offset) + bytes(
                    length
                )
            else:
                assert ch.type == CHUNK_NONE
        else:
            err, ck, data = c.simple(length if cmd == READ else 0)
            assert (err, ck) == (want, cookie)
            assert data == (bytes(length) if cmd == READ and not want else b"")
    else:
        assert len(rest) == len(reqs)
    if not rest or not isinstance(rest[-1], TERMINAL):
        assert c.rx == b""


@FAST
@given(
    session=sessions(),
    edits=st.lists(
        st.tuples(st.integers(0, 1 << 20), st.integers(0, 255), st.sampled_from("xid")),
        min_size=1,
        max_size=8,
    ),
    cuts=st.lists(st.integers(0, 1 << 20), max_size=10),
)
def test_mutated_streams_never_raise(
    session: Session,
    edits: list[tuple[int, int, str]],
    cuts: list[int],
) -> None:
    data = bytearray(session.stream)
    for pos, byte, kind in edits:
        i = pos % (len(data) + 1)
        if kind == "x" and i < len(data):
            data[i] ^= byte or 1
        elif kind == "i":
            data[i:i] = bytes([byte])
        elif kind == "d" and i < len(data):
            del data[i]
    run = Run.start(new_conn(session.read_only))
    for chunk in split(bytes(data), cuts):
        run.feed(chunk)
        if run.events and isinstance(run.events[-1], TERMINAL):
            return
    run.conn.receive_data(b"")
    run.drain()
    assert isinstance(run.events[-1], TERMINAL)


@settings(max_examples=60, deadline=None)
@given(
    where=st.sampled_from(["option", "write", "read", "trim"]),
    length=st.sampled_from([1 << 25, (1 << 25) + 1, 1 << 31, 0xFFFFFFFF]),
)
def test_huge_length_fields_allocate_nothing(where: str, length: int) -> None:
    conn = new_conn()
    run = Run.start(conn)
    run.feed(struct.pack(">I", 3))
    if where != "option":
        run.feed(option(OPT_GO, go_data("d")))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        if where == "option":
            run.feed(struct.pack(">QII", IHAVEOPT, OPT_GO, length))
            run.feed(bytes(64 * 1024))  # streams through the skip, never stored
        else:
            cmd = {"write": WRITE, "read": READ, "trim": TRIM}[where]
            run.feed(request(cmd, 1, 0, length))
            if not isinstance(run.events[-1], TERMINAL):
                run.feed(bytes(64 * 1024))
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 512 * 1024, peak
    assert conn.buffered <= BOUND


# ---------------------------------------------------------------- stateful model


class OutOfOrderSession(RuleBasedStateMachine):
    """A client and a tiny RAM server around one connection; replies in random order.

    The client keeps a shadow disk; the server applies each request when it arrives and
    answers later, in any order. Every READ reply must carry the shadow contents as of
    the request, whatever the feeding splits and reply order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conn = new_conn()
        self.rx = bytearray(self.conn.initial_bytes())
        self.disk = bytearray(SIZE)  # server side
        self.shadow = bytearray(SIZE)  # client side expectation
        self.pending: list[Request] = []
        self.read_data: dict[int, bytes] = {}
        self.expect: dict[int, tuple[int, bytes]] = {}  # cookie -> (error, READ data)
        self.cookie = 0
        self.structured = False
        self.queue = bytearray()  # client bytes not fed yet
        self.rx.clear()
        self.send(struct.pack(">I", 3) + option(OPT_SR) + option(OPT_GO, go_data("d", (3,))))
        self.feed_all()
        self.rx.clear()

    def send(self, data: bytes) -> None:
        self.queue += data

    def pump(self) -> None:
        while True:
            ev = self.conn.next_event()
            self.rx += self.conn.data_to_send()
            if isinstance(ev, NeedData):
                assert self.conn.buffered <= BOUND
                return
            assert not isinstance(ev, TERMINAL), ev
            if isinstance(ev, ExportSelected):
                self.structured = ev.structured
            elif isinstance(ev, Request):
                self.pending.append(ev)
                if ev.command is Command.READ:  # served now, answered later
                    self.read_data[ev.cookie] = bytes(self.disk[ev.offset : ev.offset + ev.length])
                elif ev.command is Command.WRITE:
                    assert ev.payload is not None
                    self.disk[ev.offset : ev.offset + ev.length] = ev.payload
                elif ev.command in (Command.TRIM, Command.WRITE_ZEROES):
                    self.disk[ev.offset : ev.offset + ev.length] = bytes(ev.length)

    def feed(self, n: int) -> None:
        chunk, self.queue = bytes(self.queue[:n]), self.queue[n:]
        if chunk:
            self.conn.receive_data(chunk)
        self.pump()

    def feed_all(self) -> None:
        self.feed(len(self.queue))

    def next_cookie(self) -> int:
        self.cookie += 0x10001
        return self.cookie

    @rule(block=st.integers(0, SIZE // 512 - 8), n=st.integers(1, 8), byte=st.integers(0, 255))
    def write(self, block: int, n: int, byte: int) -> None:
        off, data = block * 512, bytes([byte]) * (n * 512)
        cookie = self.next_cookie()
        self.shadow[off : off + len(data)] = data
        self.expect[cookie] = (0, b"")
        self.send(request(WRITE, cookie, off, len(data), FUA, data))

    @rule(block=st.integers(0, SIZE // 512 - 8), n=st.integers(1, 8), zero=st.booleans())
    def trim_or_zero(self, block: int, n: int, zero: bool) -> None:
        off, length = block * 512, n * 512
        cookie = self.next_cookie()
        self.shadow[off : off + length] = bytes(length)
        self.expect[cookie] = (0, b"")
        self.send(request(WRITE_ZEROES if zero else TRIM, cookie, off, length))

    @rule(block=st.integers(0, SIZE // 512), n=st.integers(0, 8))
    def read(self, block: int, n: int) -> None:
        off, length = block * 512, n * 512
        cookie = self.next_cookie()
        if off + length > SIZE:
            self.expect[cookie] = (EINVAL, b"")
        else:
            self.expect[cookie] = (0, bytes(self.shadow[off : off + length]))
        self.send(request(READ, cookie, off, length))

    @rule()
    def flush(self) -> None:
        cookie = self.next_cookie()
        self.expect[cookie] = (0, b"")
        self.send(request(FLUSH, cookie))

    @rule(n=st.integers(1, 5000))
    def feed_some(self, n: int) -> None:
        self.feed(n)

    @precondition(lambda self: self.pending)
    @rule(i=st.integers(0, 1000))
    def reply_one(self, i: int) -> None:
        req = self.pending.pop(i % len(self.pending))
        data = self.read_data.pop(req.cookie) if req.command is Command.READ else None
        self.rx += self.conn.reply(req, 0, data)

    @invariant()
    def replies_match_expectations(self) -> None:
        assert self.conn.in_flight == len(self.pending)
        while self.rx:
            (magic,) = struct.unpack_from(">I", self.rx)
            if magic == 0x67446698:
                _m, err, cookie = struct.unpack_from(">IIQ", self.rx)
                del self.rx[:16]
                want_err, want_data = self.expect.pop(cookie)
                assert err == want_err and want_data == b""
            else:
                _m, flags, ctype, cookie, length = struct.unpack_from(">IHHQI", self.rx)
                payload = bytes(self.rx[20 : 20 + length])
                del self.rx[: 20 + length]
                assert flags == 1
                want_err, want_data = self.expect.pop(cookie)
                if want_err:
                    assert ctype == CHUNK_ERROR
                    assert struct.unpack_from(">I", payload)[0] == want_err
                elif want_data:
                    assert ctype == CHUNK_DATA and payload[8:] == want_data
                else:
                    assert ctype == CHUNK_NONE

    def teardown(self) -> None:
        self.feed_all()
        while self.pending:
            self.reply_one(len(self.pending) // 2)
        self.replies_match_expectations()
        assert self.expect == {}
        self.send(request(DISC))
        self.conn.receive_data(bytes(self.queue))
        assert self.conn.next_event() == Disconnect("disc")


OutOfOrderSession.TestCase.settings = settings(
    max_examples=40, stateful_step_count=40, deadline=None
)
test_out_of_order_session = OutOfOrderSession.TestCase
