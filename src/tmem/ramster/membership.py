"""Heartbeat-driven membership: who is up, how much room each peer has.

The kernel's r2hb was a stub: nodes were declared up by hand and never declared
down, so a dead peer was noticed only as a failed send.  Here every node sends
heartbeats carrying its incarnation (a random id chosen at start) and its
free/total frames; a peer silent for ``dead_after`` seconds is declared down, a
heartbeat from it declares it up again, and a new incarnation means it
restarted and lost every foreign page it held (so replicas on it must be made
again).  Pure logic with an injectable clock: the asyncio node feeds it
heartbeats and calls :meth:`Membership.tick`; tests drive the clock by hand.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tmem.ramster.config import NodeSpec

log = logging.getLogger("tmem.ramster.membership")


class PeerState(enum.Enum):
    UNKNOWN = "unknown"  # configured, never heard from
    UP = "up"
    DOWN = "down"


class EventKind(enum.Enum):
    UP = "up"
    DOWN = "down"
    RESTARTED = "restarted"  # new incarnation: its foreign pages are gone
    REMOVED = "removed"  # dropped from the configuration


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    node: int
    at: float


@dataclass(slots=True)
class Peer:
    spec: NodeSpec
    state: PeerState = PeerState.UNKNOWN
    last_heard: float | None = None
    incarnation: int | None = None
    free_frames: int = 0
    total_frames: int = 0
    heartbeats: int = 0
    ups: int = 0
    downs: int = 0
    restarts: int = 0
    down_since: float | None = None


class Membership:
    """Liveness and load of every configured peer, as seen from ``local``."""

    def __init__(
        self,
        local: NodeSpec,
        nodes: Iterable[NodeSpec],
        dead_after: float,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.local = local
        self.dead_after = dead_after
        self.clock = clock
        self.on_event = on_event
        self.peers: dict[int, Peer] = {}
        self.events_total = dict.fromkeys(EventKind, 0)
        self.started = clock()
        self.set_nodes(nodes)

    def _emit(self, kind: EventKind, node: int, out: list[Event]) -> None:
        ev = Event(kind, node, self.clock())
        self.events_total[kind] += 1
        spec = self.peers[node].spec if node in self.peers else None
        log.info("node %s (%d) %s", spec.name if spec else "?", node, kind.value)
        out.append(ev)
        if self.on_event is not None:
            self.on_event(ev)

    def set_nodes(self, nodes: Iterable[NodeSpec]) -> list[Event]:
        """Adopt a new node list (config reload); removed peers are reported."""
        out: list[Event] = []
        wanted = {n.number: n for n in nodes if n.number != self.local.number}
        for num in [n for n in self.peers if n not in wanted]:
            self._emit(EventKind.REMOVED, num, out)
            del self.peers[num]
        for num, spec in wanted.items():
            if num in self.peers:
                self.peers[num].spec = spec
            else:
                self.peers[num] = Peer(spec)
        return out

    def heard(
        self, node: int, incarnation: int, free_frames: int, total_frames: int
    ) -> list[Event]:
        """A heartbeat from ``node`` arrived (unknown nodes are ignored)."""
        out: list[Event] = []
        peer = self.peers.get(node)
        if peer is None:
            return out
        now = self.clock()
        peer.last_heard = now
        peer.heartbeats += 1
        peer.free_frames = max(0, free_frames)
        peer.total_frames = max(0, total_frames)
        if peer.incarnation is not None and peer.incarnation != incarnation:
            peer.restarts += 1
            peer.incarnation = incarnation
            self._emit(EventKind.RESTARTED, node, out)
        peer.incarnation = incarnation
        if peer.state is not PeerState.UP:
            peer.state = PeerState.UP
            peer.ups += 1
            peer.down_since = None
            self._emit(EventKind.UP, node, out)
        return out

    def tick(self) -> list[Event]:
        """Declare peers silent for longer than ``dead_after`` down."""
        out: list[Event] = []
        now = self.clock()
        for num, peer in self.peers.items():
            if (
                peer.state is PeerState.UP
                and peer.last_heard is not None
                and now - peer.last_heard > self.dead_after
            ):
                peer.state = PeerState.DOWN
                peer.downs += 1
                peer.down_since = now
                peer.free_frames = 0
                self._emit(EventKind.DOWN, num, out)
        return out

    def mark_down(self, node: int) -> list[Event]:
        """Declare a peer down now (e.g. its connection failed the handshake)."""
        out: list[Event] = []
        peer = self.peers.get(node)
        if peer is not None and peer.state is PeerState.UP:
            peer.state = PeerState.DOWN
            peer.downs += 1
            peer.down_since = self.clock()
            peer.free_frames = 0
            self._emit(EventKind.DOWN, node, out)
        return out

    def is_up(self, node: int) -> bool:
        peer = self.peers.get(node)
        return peer is not None and peer.state is PeerState.UP

    def up_nodes(self) -> list[int]:
        return sorted(n for n, p in self.peers.items() if p.state is PeerState.UP)

    def free_frames(self) -> dict[int, int]:
        """Advertised free frames of every live peer (input to the target policy)."""
        return {n: p.free_frames for n, p in self.peers.items() if p.state is PeerState.UP}

    def note_used(self, node: int, frames: int) -> None:
        """Lower a peer's advertised room after sending it pages, until its next heartbeat."""
        peer = self.peers.get(node)
        if peer is not None:
            peer.free_frames = max(0, peer.free_frames - frames)

    def stats(self) -> dict[str, int | float]:
        s: dict[str, int | float] = {
            "peers_up": len(self.up_nodes()),
            "peers_configured": len(self.peers),
        }
        for kind, n in self.events_total.items():
            s[f"membership_{kind.value}_events"] = n
        return s

    def peer_table(self) -> list[dict[str, object]]:
        now = self.clock()
        return [
            {
                "node": p.spec.name,
                "number": num,
                "state": p.state.value,
                "free_frames": p.free_frames,
                "total_frames": p.total_frames,
                "heartbeats": p.heartbeats,
                "ups": p.ups,
                "downs": p.downs,
                "restarts": p.restarts,
                "silent_for": None if p.last_heard is None else round(now - p.last_heard, 3),
                # when it was declared down, on the node's clock (time.monotonic: the
                # same clock for every process of the host, so tests can time it)
                "down_since": p.down_since,
            }
            for num, p in sorted(self.peers.items())
        ]
