"""Whom a peer talks to in a round, and with what mixing weight."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from gossip.message import PeerId
from topology import Topology


class Neighbourhood(ABC):
    @abstractmethod
    def out_neighbours(self, step: int) -> list[PeerId]:
        """Peers that need this peer's model at this gossip step."""

    @abstractmethod
    def in_weights(self, step: int) -> dict[PeerId, float]:
        """Peers whose models this peer mixes at this step, with their weights (self excluded)."""

    @abstractmethod
    def self_weight(self, step: int) -> float: ...


class GraphNeighbourhood(Neighbourhood):
    """One peer's view of a fixed set of peers laid out on a topology (index i is ``peer_ids[i]``)."""

    def __init__(self, topology: Topology, peer_ids: Sequence[PeerId], me: PeerId):
        if len(peer_ids) != topology.n:
            raise ValueError(f"topology has {topology.n} peers but {len(peer_ids)} ids were given")
        self._topology = topology
        self._ids = list(peer_ids)
        self._index = self._ids.index(me)

    def out_neighbours(self, step: int) -> list[PeerId]:
        return [self._ids[j] for j in self._topology.out_neighbours(self._index, step)]

    def in_weights(self, step: int) -> dict[PeerId, float]:
        return {self._ids[j]: w for j, w in self._topology.in_weights(self._index, step).items()}

    def self_weight(self, step: int) -> float:
        return self._topology.self_weight(self._index, step)
