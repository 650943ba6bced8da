"""An in-memory network of peers on the virtual clock: each peer's uplink and downlink, latency, loss.

Every peer has an uplink, shared by everything it sends, and a downlink, shared by everything it
receives (``set_bandwidth``; by default each carries ``bandwidth`` bytes per second). A message
from src to dst of ``size`` bytes:

- starts when src's uplink is free (it sends one message at a time, in the order it sent them)
  and holds it for ``size / up[src]``;
- holds dst's downlink for ``size / down[dst]``, from the first time after it started that the
  downlink is free for that long (a downlink busy later, with a message whose sender is still busy
  with others, does not hold it up);
- arrives when both are done, plus the latency.

This is a store-and-forward approximation of links that share their capacity: a message takes
the whole of a link while it is on it, rather than a fair share beside the others, and a slow
downlink does not slow the sender's uplink down. Totals come out right (a peer that sends to 7
takes 7 times as long as to one; two senders to one peer share its downlink), single messages
may be early or late by a transfer's time.

A lost message is never delivered and never reaches the downlink; the receiver notices through
its own timeout, as it would on a real network. Loss is drawn from a generator per directed pair
seeded by the run's seed, so runs replay exactly; ``set_link`` gives a pair a latency and loss of
its own. A partition cuts some peers from the rest: messages between the two sides, sent or in
flight, are lost as well. A collective (an all-reduce of a group, ``collective``) holds every
member's uplink and downlink for its transfer.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from gossip.message import Message, PeerId
from gossip.transport import Admission, Handler, PeerUnreachable, TrafficCounters, Transport, admit_everyone
from peer.sim.links import MBIT, Schedule

log = logging.getLogger(__name__)

DEFAULT_BANDWIDTH = 100 * MBIT  # bytes per second, each way


@dataclass(frozen=True)
class LinkModel:
    """What a message meets between two peers, whatever their bandwidths."""

    latency: float = 0.01  # seconds, one way
    loss: float = 0.0  # probability that a message is lost

    def __post_init__(self) -> None:
        if self.latency < 0:
            raise ValueError(f"link latency must be >= 0 seconds, got {self.latency}")
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"link loss must be a probability in [0, 1], got {self.loss}")


class SimNetwork:
    def __init__(self, default_link: LinkModel | None = None, *, bandwidth: float = DEFAULT_BANDWIDTH, seed: int = 0):
        """``bandwidth``: bytes per second of the uplink and of the downlink of a peer not given its own."""
        _check_bandwidth(bandwidth)
        self.default_link = default_link or LinkModel()
        self.default_bandwidth = bandwidth
        self.seed = seed
        self._links: dict[tuple[PeerId, PeerId], LinkModel] = {}
        self._bandwidths: dict[PeerId, tuple[float, float]] = {}
        self._uplinks: dict[PeerId, Schedule] = {}
        self._downlinks: dict[PeerId, Schedule] = {}
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
        """The latency and loss of messages from ``src`` to ``dst``, from now on."""
        self._links[(src, dst)] = link

    def set_bandwidth(self, peer_id: PeerId, up: float, down: float | None = None) -> None:
        """Bytes per second of the peer's uplink and downlink (``down``: as ``up`` unless given);
        a peer may be given them before it attaches."""
        down = up if down is None else down
        _check_bandwidth(up)
        _check_bandwidth(down)
        self._bandwidths[peer_id] = (up, down)

    def bandwidth(self, peer_id: PeerId) -> tuple[float, float]:
        """Bytes per second of the peer's uplink and downlink."""
        return self._bandwidths.get(peer_id, (self.default_bandwidth, self.default_bandwidth))

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

    def collective(self, members: Sequence[PeerId], size: int, hops: int) -> float:
        """A collective of a group (an all-reduce) in which each member sends ``size`` bytes and
        receives as many, in ``hops`` steps one after the other: counts that traffic, holds every
        member's uplink and downlink for it, and returns the simulated seconds until it completes.

        It starts once all the members' links are through with what they carry already, moves at
        the pace of the slowest of them (a ring waits for its slowest hop), and each hop adds a latency.
        """
        now = asyncio.get_running_loop().time()
        schedules = [self._uplink(peer) for peer in members] + [self._downlink(peer) for peer in members]
        for schedule in schedules:
            schedule.forget_before(now)
        start = max(schedule.free_after(now) for schedule in schedules)
        transfer = size / min(min(self.bandwidth(peer)) for peer in members)
        for schedule in schedules:
            schedule.reserve(start, transfer)
        for peer in members:
            counters = self._endpoints[peer].counters
            counters.bytes_sent += size
            counters.bytes_received += size
            self._bytes_sent += size
        return start + transfer + hops * self.default_link.latency - now

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
        start, sent = self._upload(src, size, loop.time())
        if link.loss and self._rng(src, dst).random() < link.loss:
            return
        if self._severed(src, dst):
            return
        # A peer that is down takes nothing off its downlink; should it be back before the message
        # arrives, the message is delivered, as before there were downlinks.
        received = sent if dst in self._down else self._download(dst, size, start, loop.time())
        loop.call_at(max(sent, received) + link.latency, self._arrive, src, dst, size, on_arrival)

    def _upload(self, src: PeerId, size: int, now: float) -> tuple[float, float]:
        """When the message starts on src's uplink, after what src sent before it, and when it is off."""
        uplink = self._uplink(src)
        uplink.forget_before(now)
        start = uplink.free_after(now)
        return start, uplink.reserve(start, size / self.bandwidth(src)[0])

    def _download(self, dst: PeerId, size: int, start: float, now: float) -> float:
        """When the message, on its way from ``start``, is through dst's downlink."""
        downlink = self._downlink(dst)
        downlink.forget_before(now)
        duration = size / self.bandwidth(dst)[1]
        return downlink.reserve(downlink.first_gap(start, duration), duration)

    def _uplink(self, peer_id: PeerId) -> Schedule:
        return self._uplinks.setdefault(peer_id, Schedule())

    def _downlink(self, peer_id: PeerId) -> Schedule:
        return self._downlinks.setdefault(peer_id, Schedule())

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


def _check_bandwidth(bytes_per_second: float) -> None:
    if not bytes_per_second > 0:
        raise ValueError(f"link bandwidth must be > 0 bytes/s, got {bytes_per_second}")


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
