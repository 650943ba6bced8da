"""Whom a peer talks to in a round, and with what mixing weight."""

from __future__ import annotations

import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence

from gossip.message import PeerId
from topology import Topology, TopologyError, parse_topology

log = logging.getLogger(__name__)

# The walk's chance of staying put on a live peers' graph that came out periodic.
PERIODIC_STAY = 0.1


class Neighbourhood(ABC):
    @abstractmethod
    def out_neighbours(self, step: int) -> list[PeerId]:
        """Peers that need this peer's model at this gossip step."""

    @abstractmethod
    def in_weights(self, step: int) -> dict[PeerId, float]:
        """Peers whose models this peer mixes at this step, with their weights (self excluded)."""

    @abstractmethod
    def self_weight(self, step: int) -> float: ...

    def linked(self, step: int) -> set[PeerId]:
        """Every peer this one exchanges with from this step on, as far as it can tell now.

        Per-link state (public copies for compressed gossip) is kept for these peers only.
        """
        return set(self.in_weights(step)) | set(self.out_neighbours(step))

    def walk_row(self, stay: float = 0.0) -> dict[PeerId, float]:
        """Where a random walk goes from this peer: the base chain's probabilities (``topology.walk``),
        this peer included; TopologyError when the graph has no walk."""
        raise TopologyError(f"{type(self).__name__} has no graph for a random walk")

    def admits(self, peer: PeerId) -> bool:
        """Whether a model from ``peer`` may be mixed at all (False: known to train something else)."""
        return True

    def unreachable(self, peer: PeerId) -> None:
        """Told when a model could not be sent to ``peer``; a changing neighbourhood may drop it."""

    def pulls(self, peer: PeerId) -> bool:
        """Whether ``peer`` accepts no connections (a peer in client mode, behind a NAT): it is not
        sent models, it fetches them."""
        return False

    def departed(self, peer: PeerId) -> None:
        """Told when ``peer`` said goodbye (or has not joined yet): it is neither sent to nor waited for."""

    def arrived(self, peer: PeerId) -> None:
        """Told when ``peer`` joined: it is a neighbour again, where the graph puts it."""


class GraphNeighbourhood(Neighbourhood):
    """One peer's view of a fixed set of peers laid out on a topology (index i is ``peer_ids[i]``)."""

    def __init__(self, topology: Topology, peer_ids: Sequence[PeerId], me: PeerId):
        if len(peer_ids) != topology.n:
            raise ValueError(f"topology has {topology.n} peers but {len(peer_ids)} ids were given")
        self._topology = topology
        self._ids = list(peer_ids)
        self._index = self._ids.index(me)
        self._linked: set[PeerId] | None = None
        self._absent: set[PeerId] = set()  # placed on the graph, but gone or not yet joined

    def departed(self, peer: PeerId) -> None:
        self._absent.add(peer)

    def arrived(self, peer: PeerId) -> None:
        self._absent.discard(peer)

    def out_neighbours(self, step: int) -> list[PeerId]:
        peers = (self._ids[j] for j in self._topology.out_neighbours(self._index, step))
        return [peer for peer in peers if peer not in self._absent]

    def in_weights(self, step: int) -> dict[PeerId, float]:
        weights = self._topology.in_weights(self._index, step).items()
        return {self._ids[j]: w for j, w in weights if self._ids[j] not in self._absent}

    def self_weight(self, step: int) -> float:
        return self._topology.self_weight(self._index, step)

    def walk_row(self, stay: float = 0.0) -> dict[PeerId, float]:
        row = self._topology.walk_row(self._index, stay)
        me = self._ids[self._index]
        return {self._ids[j]: p for j, p in row.items() if self._ids[j] == me or self._ids[j] not in self._absent}

    def linked(self, step: int) -> set[PeerId]:
        if self._topology.drawn:  # a fresh graph each step: this step's links are all there is
            return set(self.in_weights(step)) | set(self.out_neighbours(step))
        # A time-varying graph cycles through its period: a link unused this step comes back.
        if self._linked is None:
            self._linked = {
                self._ids[j]
                for phase in range(self._topology.period)
                for j in (*self._topology.in_weights(self._index, phase), *self._topology.out_neighbours(self._index, phase))
            }
        return self._linked


def spread(reachable: Sequence[PeerId], clients: Sequence[PeerId]) -> list[PeerId]:
    """The layout of the peers on the topology: the reachable peers in order, each followed by an
    even share of the clients. On a ring no two clients are next to each other while there are
    no more clients than reachable peers, and every client has a reachable neighbour while there
    are at most twice as many."""
    if not reachable:
        return list(clients)
    shares: list[list[PeerId]] = [[] for _ in reachable]
    for index, client in enumerate(clients):
        shares[index * len(reachable) // len(clients)].append(client)
    return [peer for first, share in zip(reachable, shares) for peer in (first, *share)]


class OverlayNeighbourhood(Neighbourhood):
    """Neighbours drawn from a changing set of live peers.

    The live peers, sorted by id, are laid out on the topology, so every peer with the same
    view computes the same graph; the graph is rebuilt whenever the view changes. Alone, a
    peer keeps its own model.

    Peers in client mode (``clients``) accept no connections: two of them cannot exchange
    anything, so they are spread among the reachable peers (``spread``) and the links the graph
    still puts between two of them are folded into the self weights; a reachable peer does not
    send to a client, which fetches its neighbours' models instead (``pulls``).
    """

    def __init__(
        self,
        spec: str,
        me: PeerId,
        view: Callable[[], Iterable[PeerId]],
        *,
        weights: str = "metropolis",
        seed: int = 0,
        admits: Callable[[PeerId], bool] = lambda peer: True,
        unreachable: Callable[[PeerId], None] = lambda peer: None,
        clients: Callable[[], Iterable[PeerId]] = tuple,
    ):
        self.spec = spec
        self.me = me
        self._view = view
        self._clients = clients
        self._pulling: frozenset[PeerId] = frozenset()
        self.admits = admits  # e.g. refuses peers whose membership record shows another model
        self.unreachable = unreachable  # e.g. leaves a crashed peer out of the view
        self._weights = weights
        self._seed = seed
        self._ids: tuple[PeerId, ...] = ()
        self._graph: GraphNeighbourhood | None = None
        self._warned_periodic: tuple[PeerId, ...] = ()

    def _current(self) -> GraphNeighbourhood | None:
        peers = set(self._view()) | {self.me}
        clients = frozenset(self._clients()) & peers
        ids = tuple(spread(sorted(peers - clients), sorted(clients)))
        if (ids, clients) != (self._ids, self._pulling):
            self._ids = ids
            self._pulling = clients
            self._graph = None
            if len(ids) >= 2:
                try:
                    topology = parse_topology(self.spec, len(ids), weights=self._weights, seed=self._seed)
                except TopologyError as reason:
                    # Some graphs exist only for some sizes (a torus of a prime number of peers);
                    # a ring always does, and keeps the swarm connected until the size suits again.
                    log.warning("%s with %d peers is impossible (%s); using a ring", self.spec, len(ids), reason)
                    topology = parse_topology("ring", len(ids), weights=self._weights)
                topology = topology.without_links_among({ids.index(peer) for peer in clients})
                self._graph = GraphNeighbourhood(topology, ids, self.me)
                if self.me in clients and not self._graph.in_weights(0):
                    log.warning("this peer accepts no connections and the overlay gives it no reachable neighbour")
        return self._graph

    def pulls(self, peer: PeerId) -> bool:
        self._current()
        return peer in self._pulling

    def out_neighbours(self, step: int) -> list[PeerId]:
        graph = self._current()
        return graph.out_neighbours(step) if graph else []

    def in_weights(self, step: int) -> dict[PeerId, float]:
        graph = self._current()
        return graph.in_weights(step) if graph else {}

    def self_weight(self, step: int) -> float:
        graph = self._current()
        return graph.self_weight(step) if graph else 1.0

    def linked(self, step: int) -> set[PeerId]:
        graph = self._current()
        return graph.linked(step) if graph else set()

    def walk_row(self, stay: float = 0.0) -> dict[PeerId, float]:
        graph = self._current()
        if graph is None:
            return {self.me: 1.0}
        try:
            return graph.walk_row(stay)
        except TopologyError as reason:
            # The live peers' graph came out periodic (an even ring): a walk that sometimes stays
            # put still settles, and the swarm cannot wait for its size to change.
            if stay >= PERIODIC_STAY:
                raise
            if self._warned_periodic != self._ids:
                self._warned_periodic = self._ids
                log.warning(
                    "%s; the token stays put with probability %g meanwhile", reason, PERIODIC_STAY
                )
            return graph.walk_row(PERIODIC_STAY)


class RandomGroups(Neighbourhood):
    """Groups of ``size`` live peers, drawn afresh at every step, each averaging uniformly within.

    Every peer with the same view of the live peers draws the same groups (a shuffle seeded by the
    run's seed and the step), so the members of a group send to each other and wait for nobody
    else. When the live peers do not divide into groups of ``size``, those left over keep their
    own model for that step; the draw changes every step, so nobody is left over for long.
    """

    def __init__(self, me: PeerId, view: Callable[[], Iterable[PeerId]], size: int, *, seed: int = 0):
        if size < 2:
            raise ValueError(f"a group has at least 2 peers, got {size}")
        self.me = me
        self._view = view
        self.size = size
        self._seed = seed

    def group(self, step: int) -> list[PeerId]:
        """This peer's group at ``step``, itself included."""
        peers = sorted(set(self._view()) | {self.me})
        random.Random(f"{self._seed}:{step}").shuffle(peers)
        index = peers.index(self.me)
        if index >= len(peers) - len(peers) % self.size:
            return [self.me]
        first = index - index % self.size
        return peers[first:first + self.size]

    def out_neighbours(self, step: int) -> list[PeerId]:
        return [peer for peer in self.group(step) if peer != self.me]

    def in_weights(self, step: int) -> dict[PeerId, float]:
        group = self.group(step)
        return {peer: 1.0 / len(group) for peer in group if peer != self.me}

    def self_weight(self, step: int) -> float:
        return 1.0 / len(self.group(step))

    def linked(self, step: int) -> set[PeerId]:
        return set(self.out_neighbours(step))
