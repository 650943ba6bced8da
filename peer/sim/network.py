"""An in-memory network of peers: per-link latency, bandwidth and loss, on the virtual clock.

Each directed link sends one message at a time: a message starts when the link is free,
takes ``size / bandwidth`` to transmit and ``latency`` to arrive. A lost message is never
delivered; the receiver notices through its own timeout, as it would on a real network.
Loss is drawn from a generator per link seeded by the run's seed, so runs replay exactly.
A partition cuts some peers from the rest: messages between the two sides, sent or in flight,
are lost as well.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gossip.message import Message, PeerId
from gossip.transport import Admission, Handler, PeerUnreachable, TrafficCounters, Transport, admit_everyone

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkModel:
    latency: float = 0.01  # seconds, one way
    bandwidth: float = 12.5e6  # bytes per second (100 Mbit/s)
    loss: float = 0.0  # probability that a message is lost

    def __post_init__(self) -> None:
        if self.latency < 0:
            raise ValueError(f"link latency must be >= 0 seconds, got {self.latency}")
        if self.bandwidth <= 0:
            raise ValueError(f"link bandwidth must be > 0 bytes/s, got {self.bandwidth}")
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"link loss must be a probability in [0, 1], got {self.loss}")


class SimNetwork:
    def __init__(self, default_link: LinkModel | None = None, *, seed: int = 0):
        self.default_link = default_link or LinkModel()
        self.seed = seed
        self._links: dict[tuple[PeerId, PeerId], LinkModel] = {}
        self._free_at: dict[tuple[PeerId, PeerId], float] = {}
        self._loss_rng: dict[tuple[PeerId, PeerId], random.Random] = {}
        self._endpoints: dict[PeerId, SimTransport] = {}
        self._down: set[PeerId] = set()
        self._cut_off: frozenset[PeerId] = frozenset()  # one side of a partition; the rest is the other
        self._bytes_sent = 0  # a running total: every record of a run reads it

    def attach(self, peer_id: PeerId, admits: Admission = admit_everyone) -> SimTransport:
        """A new peer's endpoint. The simulator's peers are all members of one swarm, so by default
        it admits everyone; a scenario with outsiders gives it the admission of its swarm."""
        if peer_id in self._endpoints:
            raise ValueError(f"peer id {peer_id!r} is already attached to this network")
        transport = SimTransport(self, peer_id, admits)
        self._endpoints[peer_id] = transport
        return transport

    def set_link(self, src: PeerId, dst: PeerId, link: LinkModel) -> None:
        self._links[(src, dst)] = link

    def crash(self, peer_id: PeerId) -> None:
        """From now on the peer neither sends nor receives anything, and what it was doing stops."""
        self._down.add(peer_id)
        self._endpoints[peer_id].stop()

    def restart(self, peer_id: PeerId) -> SimTransport:
        """A crashed peer comes back as a fresh process: a new endpoint, nothing it served before."""
        if peer_id not in self._down:
            raise ValueError(f"peer {peer_id!r} is not down")
        self._down.discard(peer_id)
        previous = self._endpoints[peer_id]
        transport = SimTransport(self, peer_id, previous.admits)
        transport.counters = previous.counters  # the network's tally of the peer goes on
        self._endpoints[peer_id] = transport
        return transport

    def cut(self, side: Iterable[PeerId]) -> None:
        """Partition the network: from now on messages between ``side`` and the other peers
        (newcomers included) are lost, until ``heal``; within a side they flow."""
        self._cut_off = frozenset(side)

    def heal(self) -> None:
        self._cut_off = frozenset()

    def _severed(self, src: PeerId, dst: PeerId) -> bool:
        return (src in self._cut_off) != (dst in self._cut_off)

    def is_up(self, peer_id: PeerId) -> bool:
        return peer_id in self._endpoints and peer_id not in self._down

    def bytes_sent(self) -> int:
        """By every peer of the network, up or down, since the start."""
        return self._bytes_sent

    def count_collective(self, peer_id: PeerId, size: int) -> None:
        """A peer's part in a collective (an all-reduce): ``size`` bytes sent and as many received."""
        counters = self._endpoints[peer_id].counters
        counters.bytes_sent += size
        counters.bytes_received += size
        self._bytes_sent += size

    def rejected(self) -> int:
        return sum(endpoint.counters.rejected for endpoint in self._endpoints.values())

    def peers(self) -> list[PeerId]:
        return [p for p in self._endpoints if p not in self._down]

    def transmit(self, src: PeerId, dst: PeerId, message: Message, on_arrival: Callable[[SimTransport], None]) -> None:
        if dst not in self._endpoints:
            raise PeerUnreachable(f"{dst!r} is not a peer of this network")
        if src in self._down:
            return
        size = message.wire_size()
        self._endpoints[src].counters.bytes_sent += size
        self._bytes_sent += size
        self._endpoints[src].counters.messages_sent += 1
        link = self._links.get((src, dst), self.default_link)
        loop = asyncio.get_running_loop()
        start = max(loop.time(), self._free_at.get((src, dst), 0.0))
        self._free_at[(src, dst)] = start + size / link.bandwidth
        if link.loss and self._rng(src, dst).random() < link.loss:
            return
        if self._severed(src, dst):
            return
        arrival = start + size / link.bandwidth + link.latency
        loop.call_at(arrival, self._arrive, src, dst, size, on_arrival)

    def _arrive(self, src: PeerId, dst: PeerId, size: int, on_arrival: Callable[[SimTransport], None]) -> None:
        if dst in self._down or self._severed(src, dst):
            return
        counters = self._endpoints[dst].counters
        counters.bytes_received += size
        counters.messages_received += 1
        on_arrival(self._endpoints[dst])

    def _rng(self, src: PeerId, dst: PeerId) -> random.Random:
        key = (src, dst)
        if key not in self._loss_rng:
            self._loss_rng[key] = random.Random(f"{self.seed}:{src}->{dst}")
        return self._loss_rng[key]


class SimTransport(Transport):
    def __init__(self, network: SimNetwork, peer_id: PeerId, admits: Admission = admit_everyone):
        self.network = network
        self.peer_id = peer_id
        self.admits = admits
        self.counters = TrafficCounters()
        self._handlers: dict[str, Handler] = {}
        self._tasks: set[asyncio.Task] = set()

    def serve(self, kind: str, handler: Handler) -> None:
        if kind in self._handlers:
            raise ValueError(f"messages of kind {kind!r} are served already; each kind has one handler")
        self._handlers[kind] = handler

    def stop(self) -> None:
        """Cancel the handlers still running: a crashed peer finishes nothing."""
        for task in list(self._tasks):
            task.cancel()

    def reachable(self) -> list[PeerId]:
        return [p for p in self.network.peers() if p != self.peer_id]

    async def send(self, peer: PeerId, message: Message) -> None:
        self.network.transmit(self.peer_id, peer, message, lambda endpoint: endpoint._dispatch(message, None))

    async def request(self, peer: PeerId, message: Message, timeout: float) -> Message:
        reply: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.network.transmit(self.peer_id, peer, message, lambda endpoint: endpoint._dispatch(message, reply))
        async with asyncio.timeout(timeout):
            return await reply

    def _dispatch(self, message: Message, reply: asyncio.Future[Message] | None) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(self._handlers.get(message.kind), message, reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, handler: Handler | None, message: Message, reply: asyncio.Future[Message] | None) -> None:
        """Admit the message, as the real transport does before it even reads the kind, then run its
        handler (the one served when it arrived). The admission is asked in this task because it
        may wait (one that re-reads membership records); the default one does not, so no handler
        starts later for it."""
        if not await self.admits(message.sender):
            self.counters.reject("not-member")
            log.info("%s: refused a %r message from %s, which is not a member", self.peer_id, message.kind, message.sender)
            return
        if handler is None:
            self.counters.reject("unknown-kind")
            log.warning("%s: no handler for message kind %r from %s", self.peer_id, message.kind, message.sender)
            return
        try:
            answer = await handler(message)
        except Exception:
            log.exception("%s: handler for %r failed", self.peer_id, message.kind)
            return
        if reply is None or answer is None:
            return

        def deliver(_: SimTransport) -> None:
            if not reply.done():
                reply.set_result(answer)

        self.network.transmit(self.peer_id, message.sender, answer, deliver)
