"""Averaging in groups in the simulator: one group per round, of the live peers.

A round's group is the peers that were members and up when its first peer arrived. It averages as
soon as every one of them that is still up has arrived, or ``timeout`` seconds after the first
did, without the others; a peer that went down meanwhile is left out (as a member that fails
during a real all-reduce). The mean is taken in a fixed order, so runs replay exactly.

What it costs depends on the run's codec. With k members, each contributing S bytes on the wire
(through the codec; S is measured once per layout of the tensors averaged, as one round may
average some of a model's tensors and the next round others):

- a dense codec (``not codec.sparse``: none, the casts, int8): a ring all-reduce. Each member
  sends and receives 2 (k - 1) / k S bytes, in 2 (k - 1) hops. Its all-gather half carries the
  mean through the codec too, so every member gets decode(encode(mean)) (the mean itself when
  the codec is lossless).
- a sparse codec (``codec.sparse``: top-k, random-k): a sum of sparse encodings is not sparse, so
  the group gathers every member's encoding instead. Each member sends and receives (k - 1) S
  bytes, in k - 1 hops, and gets the exact mean of the contributions (which callers decode
  from their encoding before they hand them in).

The network holds every member's uplink and downlink for it (``SimNetwork.collective``): the mean
arrives once all of them were free, plus those bytes over the slowest member link, plus a latency
per hop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from gossip.averaging import Averaged, GroupAveraging
from gossip.codecs import Codec, wire_bytes
from gossip.learner import State
from gossip.message import PeerId
from gossip.model_codec import ModelMessages
from peer.sim.network import SimNetwork

# What decides a contribution's size on the wire: its tensors' names, shapes and dtypes.
Layout = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]


@dataclass
class _Group:
    expected: frozenset[PeerId]
    done: asyncio.Future[Averaged | None]
    arrived: dict[PeerId, State] = field(default_factory=dict)
    closed: bool = False  # it has averaged (its mean may still be on its way)


class AveragingRoom:
    """Where the simulated peers of one network average; each peer averages through ``join(peer)``."""

    def __init__(self, network: SimNetwork, codec: Codec):
        self.network = network
        self.codec = codec
        self.members: set[PeerId] = set()
        self._groups: dict[int, _Group] = {}  # the rounds whose group has not handed out its mean yet
        self._over: set[int] = set()  # the rounds whose group has
        self._sizes: dict[Layout, int] = {}  # bytes of one contribution on the wire, by layout
        self.peak_bytes = 0  # the most bytes a member sent in one round's average

    def join(self, peer: PeerId) -> SimAveraging:
        self.members.add(peer)
        return SimAveraging(self, peer)

    async def average(self, peer: PeerId, round_: int, state: State, timeout: float) -> Averaged | None:
        if round_ in self._over:
            return None
        group = self._groups.get(round_) or self._open(round_, timeout)
        if group.closed:
            return None  # too late: the group has averaged without us
        group.arrived[peer] = state
        self._close_when_complete(round_)
        return await asyncio.shield(group.done)

    def _open(self, round_: int, timeout: float) -> _Group:
        loop = asyncio.get_running_loop()
        expected = frozenset(member for member in self.members if self.network.is_up(member))
        group = self._groups[round_] = _Group(expected, loop.create_future())
        loop.call_later(timeout, self._close, round_)
        return group

    def _close_when_complete(self, round_: int) -> None:
        group = self._groups[round_]
        if all(peer in group.arrived for peer in group.expected if self.network.is_up(peer)):
            self._close(round_)

    def _close(self, round_: int) -> None:
        group = self._groups.get(round_)
        if group is None or group.closed:
            return  # its deadline, after it averaged
        group.closed = True
        arrived, group.arrived = group.arrived, {}  # the closed group keeps no tensors
        members = sorted(peer for peer in arrived if self.network.is_up(peer))
        if len(members) < 2:
            self._hand_out(round_, None)
            return
        mean = {name: torch.stack([arrived[peer][name] for peer in members]).mean(0) for name in arrived[members[0]]}
        if not (self.codec.sparse or self.codec.lossless):
            mean = self._through_codec(mean, round_)
        delay = self._charge(members, arrived[members[0]])
        asyncio.get_running_loop().call_later(delay, self._hand_out, round_, Averaged(mean, frozenset(members)))

    def _hand_out(self, round_: int, result: Averaged | None) -> None:
        """Give the group's members its mean; the room forgets the group, and late comers get None."""
        self._groups.pop(round_).done.set_result(result)
        self._over.add(round_)

    def _through_codec(self, mean: State, round_: int) -> State:
        """The mean as the ring's all-gather hands it on: encoded and decoded by the codec."""
        messages = ModelMessages(mean, self.codec)
        tensors, meta, spec = messages.encode(mean, seed=round_)
        return {**mean, **messages.decode(tensors, spec, meta)}

    def _charge(self, members: list[PeerId], contribution: State) -> float:
        """Count each member's traffic and hold its links; the seconds until the mean arrives."""
        k, size = len(members), self.wire_size(contribution)
        moved, hops = ((k - 1) * size, k - 1) if self.codec.sparse else (2 * (k - 1) * size // k, 2 * (k - 1))
        self.peak_bytes = max(self.peak_bytes, moved)
        return self.network.collective(members, moved, hops=hops)

    def wire_size(self, contribution: State) -> int:
        """Bytes of a contribution laid out as this one on the wire, through the codec."""
        layout = tuple((name, tuple(tensor.shape), tensor.dtype) for name, tensor in contribution.items())
        if layout not in self._sizes:
            tensors, _, _ = ModelMessages(contribution, self.codec).encode(contribution, seed=0)
            self._sizes[layout] = wire_bytes(tensors)
        return self._sizes[layout]


class SimAveraging(GroupAveraging):
    """One simulated peer's averaging: its door to the room."""

    def __init__(self, room: AveragingRoom, peer: PeerId):
        self.room = room
        self.peer = peer

    async def average(self, round_: int, state: State, timeout: float) -> Averaged | None:
        return await self.room.average(self.peer, round_, state, timeout)
