"""The two interfaces every protocol is written against: Transport and Clock.

A protocol never knows whether it runs in the simulator or on a real network. The simulator
(`peer.sim`) and the real world (hivemind P2P, wall clock) each implement both.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gossip.message import Message, PeerId

T = TypeVar("T")

# A handler gets an incoming message; for a request its return value is the reply.
Handler = Callable[[Message], Awaitable[Message | None]]

# Whether a peer is a member of this swarm. A transport asks it of every incoming message's sender
# before any handler sees the message, whatever its kind, so that no protocol can forget to; a
# reply to our own request is not asked about (we chose whom to ask).
Admission = Callable[[PeerId], Awaitable[bool]]


async def admit_everyone(peer: PeerId) -> bool:
    """The admission of a swarm without membership records (the simulator's, a test's): all are members."""
    return True


class PeerUnreachable(ConnectionError):
    """Raised when a message cannot be handed to a peer (unknown, down or refused)."""


# Why a message was refused. A fixed set, so that a hostile peer cannot invent new labels.
REJECTION_REASONS = (
    "malformed",  # not a message on the wire: truncated, oversized, not msgpack, bad fields
    "over-capacity",  # a stream past the caps on open streams (per peer or in all): closed unread
    "too-slow",  # its header or payload did not arrive within the deadline
    "ignored",  # from a peer ignored for a while after too many refused messages: closed unread
    "wrong-sender",  # claims a sender other than the peer that sent it
    "unknown-kind",  # no handler serves its kind
    "invalid-model",  # wrong names, shapes or dtypes, non-finite values, a bad codec payload
    "outlier",  # a valid model too far from ours to be mixed (gossip.robust's guard)
    "incompatible",  # from a peer whose membership record shows another task or model
    "not-member",  # from a peer outside a private swarm or its peer list, or a pull by a stranger
    "stale-proof",  # a stream's proof of the swarm key is too old (or from a clock far off ours)
    "replayed",  # a stream's proof of the swarm key was used before
    "stale-token",  # a walking token older than one this peer has seen (a hop counter that went backwards)
    # a claim its sender cannot make: a round further ahead than the swarm can have gone, the end of
    # a run from a peer that did not hold its last round, a walk's word from a peer off the token's path
    "implausible",
)


@dataclass
class TrafficCounters:
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    rejections: Counter[str] = field(default_factory=Counter)

    def reject(self, reason: str) -> None:
        if reason not in REJECTION_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}; valid: {REJECTION_REASONS}")
        self.rejections[reason] += 1

    @property
    def rejected(self) -> int:
        return sum(self.rejections.values())


class Transport(ABC):
    """Moves messages between this peer and others.

    Every incoming message passes the transport's ``Admission`` before its handler runs; one from
    a peer that is not a member is dropped and counted as ``not-member``.
    """

    peer_id: PeerId
    counters: TrafficCounters

    @abstractmethod
    async def send(self, peer: PeerId, message: Message) -> None:
        """Send a one-way message. Delivery is not confirmed; loss shows up as a timeout."""

    @abstractmethod
    async def request(self, peer: PeerId, message: Message, timeout: float) -> Message:
        """Send a message and wait for the handler's reply; raises TimeoutError or PeerUnreachable."""

    @abstractmethod
    def serve(self, kind: str, handler: Handler) -> None:
        """Route incoming messages of this kind to ``handler``."""

    @abstractmethod
    def reachable(self) -> list[PeerId]:
        """The peers this transport currently knows how to reach."""


class Clock(ABC):
    """Time as a protocol sees it, and the cost of local work."""

    @abstractmethod
    def now(self) -> float:
        """Seconds since this peer started."""

    @abstractmethod
    async def sleep(self, seconds: float) -> None: ...

    def timeout(self, seconds: float) -> AbstractAsyncContextManager[Any]:
        """A deadline for the enclosed block; both worlds run on an event loop whose time is the clock's."""
        return asyncio.timeout(seconds)

    @abstractmethod
    async def compute(self, work: Callable[..., T], *args: Any, steps: int) -> T:
        """Run local work (training) made of ``steps`` optimisation steps and return its result.

        The real clock runs it in a worker thread so that the peer keeps serving its
        neighbours; the simulated clock runs it inline and charges the peer's speed profile.
        """
