"""The Topology object: who mixes with whom, with what weights, in each round."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import networkx as nx
import numpy as np

from topology.graphs import ONE_PEER_EXPONENTIAL, TopologyError, build_graph, split_spec
from topology.walk import base_chain
from topology.weights import metropolis_hastings, spectral_gap, uniform

WEIGHT_SCHEMES = ("metropolis", "uniform")


@dataclass(frozen=True)
class _Round:
    """One round's W, with the per-peer views that peers query many times per round."""

    matrix: np.ndarray
    in_weights: list[dict[int, float]]
    self_weights: list[float]
    out_neighbours: list[list[int]]

    @classmethod
    def of(cls, matrix: np.ndarray) -> _Round:
        n = matrix.shape[0]
        matrix.flags.writeable = False  # shared by every caller, so nobody may edit it
        in_weights: list[dict[int, float]] = [{} for _ in range(n)]
        out_neighbours: list[list[int]] = [[] for _ in range(n)]
        rows, cols = np.nonzero(matrix)  # row-major, so each out list comes out sorted
        for i, j in zip(rows.tolist(), cols.tolist()):
            if i != j:
                in_weights[i][j] = float(matrix[i, j])
                out_neighbours[j].append(i)
        return cls(matrix, in_weights, matrix.diagonal().tolist(), out_neighbours)


class Topology:
    """Mixing weights per round for n peers; static graphs have period 1.

    Round r uses W(r mod period); each distinct W and its per-peer views are built once.
    ``graph`` is the fixed graph of a static topology, None when the graph changes every round.
    """

    def __init__(
        self,
        spec: str,
        n: int,
        period: int,
        matrix_for_phase: Callable[[int], np.ndarray],
        graph: nx.Graph | None = None,
    ) -> None:
        self.spec = spec
        self.n = n
        self.period = period
        self.graph = graph
        self._matrix_for_phase = matrix_for_phase
        self._rounds: dict[int, _Round] = {}
        self._spectral_gap: float | None = None
        self._walk_chains: dict[float, np.ndarray] = {}

    @property
    def time_varying(self) -> bool:
        return self.period > 1

    def _round(self, round: int) -> _Round:
        phase = round % self.period
        cached = self._rounds.get(phase)
        if cached is None:
            cached = self._rounds[phase] = _Round.of(self._matrix_for_phase(phase))
        return cached

    def _check_peer(self, peer: int) -> None:
        # Negative ids would silently index from the end of the per-peer lists.
        if not 0 <= peer < self.n:
            raise IndexError(f"peer {peer} is outside 0..{self.n - 1}")

    def mixing_matrix(self, round: int) -> np.ndarray:
        """W(round), read-only: x_i <- sum_j W[i, j] x_j."""
        return self._round(round).matrix

    def in_weights(self, peer: int, round: int) -> dict[int, float]:
        """The models peer waits for in this round, with their weights (peer itself excluded)."""
        self._check_peer(peer)
        return dict(self._round(round).in_weights[peer])

    def self_weight(self, peer: int, round: int) -> float:
        """The weight peer gives its own model in this round."""
        self._check_peer(peer)
        return self._round(round).self_weights[peer]

    def out_neighbours(self, peer: int, round: int) -> list[int]:
        """The peers that need peer's model in this round, sorted."""
        self._check_peer(peer)
        return list(self._round(round).out_neighbours[peer])

    def spectral_gap(self) -> float:
        """Gap of W; for a time-varying topology, of W(period-1) ... W(0), one full period."""
        if self._spectral_gap is None:
            product = np.eye(self.n)
            for phase in range(self.period):
                product = self.mixing_matrix(phase) @ product
            self._spectral_gap = spectral_gap(product)
        return self._spectral_gap

    def walk_row(self, peer: int, stay: float = 0.0) -> dict[int, float]:
        """The base chain's row from peer: peer itself (even at probability 0) and every peer
        the token moves to from there with positive probability.
        """
        self._check_peer(peer)
        if self.graph is None:
            raise TopologyError(
                f"the token walks a fixed graph; {self.spec} changes every round: "
                "use ring, regular:D, erdos:P or another static undirected topology"
            )
        chain = self._walk_chains.get(stay)
        if chain is None:
            chain = self._walk_chains[stay] = base_chain(self.graph, stay=stay)
        row = chain[peer].tolist()
        return {j: p for j, p in enumerate(row) if j == peer or p > 0}

    def without_links_among(self, peers: set[int]) -> Topology:
        """The same topology with no link between two of ``peers`` (peers that cannot reach each
        other): each such weight moves onto the diagonal of its row, so every row still sums to
        one, and a symmetric W stays symmetric, hence doubly stochastic."""
        cut = sorted(peers)
        if len(cut) < 2:
            return self

        def matrix(phase: int) -> np.ndarray:
            folded = self.mixing_matrix(phase).copy()
            block = np.ix_(cut, cut)
            kept = folded[block].sum(axis=1)  # each row's weights within the block, its own included
            folded[block] = 0.0
            folded[cut, cut] = kept
            return folded

        graph = None
        if self.graph is not None:
            graph = self.graph.copy()
            graph.remove_edges_from([(i, j) for i in cut for j in cut if graph.has_edge(i, j)])
        return Topology(self.spec, self.n, self.period, matrix, graph)

    def __repr__(self) -> str:
        return f"Topology({self.spec!r}, n={self.n}, period={self.period})"


def parse_topology(spec: str, n: int, *, weights: str = "metropolis", seed: int = 0) -> Topology:
    """The Topology that ``spec`` names on n peers (see TOPOLOGY_NAMES).

    ``weights`` is "metropolis" (Metropolis-Hastings) or "uniform" (1 / (in-degree + 1)).
    Directed graphs (``exponential``) have no Metropolis-Hastings weights, so they always
    use uniform ones, which are doubly stochastic there; ``onepeer-exponential`` always uses
    W(k) = (I + S^(2^(k mod tau))) / 2. ``seed`` drives the random generators.
    """
    if weights not in WEIGHT_SCHEMES:
        raise TopologyError(f"unknown weights {weights!r}; valid: {', '.join(WEIGHT_SCHEMES)}")
    name, _ = split_spec(spec)
    if name == ONE_PEER_EXPONENTIAL:
        if n < 2:
            raise TopologyError(f"topology {spec!r} needs at least 2 peers, got {n}")
        return Topology(spec, n, one_peer_exponential_period(n),
                        lambda phase: one_peer_exponential_matrix(n, phase))
    graph = build_graph(spec, n, seed)
    scheme = metropolis_hastings if weights == "metropolis" and not graph.is_directed() else uniform
    matrix = scheme(graph)
    return Topology(spec, n, 1, lambda _phase: matrix, graph)


def one_peer_exponential_period(n: int) -> int:
    """tau = ceil(log2 n): the hops 1, 2, ..., 2^(tau-1) then repeat."""
    return (n - 1).bit_length()


def one_peer_exponential_matrix(n: int, round: int) -> np.ndarray:
    """W(k) = (I + S^h) / 2 with h = 2^(k mod tau): peer i averages with peer (i - h) mod n."""
    hop = 2 ** (round % one_peer_exponential_period(n))
    peers = np.arange(n)
    matrix = np.zeros((n, n))
    matrix[peers, peers] = 0.5
    matrix[peers, (peers - hop) % n] = 0.5
    return matrix
