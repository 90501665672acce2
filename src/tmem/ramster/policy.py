"""Target choice for remotified pages, behind one small interface.

The kernel sent every remote put to one configured node (``manual``); with
``replicas`` copies on distinct nodes we need an ordered choice of several, and a
policy that follows load (``least-loaded``, by the free frames each peer
advertises in its heartbeats) spreads pages instead of filling one peer.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Protocol

from tmem.errors import ConfigError


class TargetPolicy(Protocol):
    """Choose up to ``count`` distinct targets among live peers."""

    name: str

    def choose(
        self, free_frames: Mapping[int, int], count: int, exclude: Collection[int] = ()
    ) -> list[int]:
        """``free_frames`` maps each live peer's number to its advertised free frames.

        Returns at most ``count`` distinct node numbers, best first, none from
        ``exclude`` and none advertising zero free frames.
        """
        ...


class LeastLoaded:
    """Most advertised free frames first; ties broken by node number (deterministic)."""

    name = "least-loaded"

    def choose(
        self, free_frames: Mapping[int, int], count: int, exclude: Collection[int] = ()
    ) -> list[int]:
        ranked = sorted(
            (n for n, free in free_frames.items() if free > 0 and n not in exclude),
            key=lambda n: (-free_frames[n], n),
        )
        return ranked[: max(count, 0)]


class Manual:
    """The configured node first (the kernel's remote_target_nodenum).

    Further replicas, which the kernel never had, come from the least-loaded
    peers so that ``replicas = 2`` still lands on two distinct nodes.
    """

    name = "manual"

    def __init__(self, target: int) -> None:
        self.target = target

    def choose(
        self, free_frames: Mapping[int, int], count: int, exclude: Collection[int] = ()
    ) -> list[int]:
        if count <= 0:
            return []
        first: list[int] = []
        if (
            self.target in free_frames
            and free_frames[self.target] > 0
            and self.target not in exclude
        ):
            first = [self.target]
        rest = LeastLoaded().choose(free_frames, count - len(first), set(exclude) | {self.target})
        return first + rest


def make_policy(name: str, target: int | None = None) -> TargetPolicy:
    """Build a policy by its config name."""
    if name == "least-loaded":
        return LeastLoaded()
    if name == "manual":
        if target is None:
            raise ConfigError("policy 'manual' needs a target node")
        return Manual(target)
    raise ConfigError(f"unknown target policy {name!r}")
