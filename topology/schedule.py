"""The Topology object: who mixes with whom, with what weights, in each round."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import networkx as nx
import numpy as np

from topology.base_graph import base_graph_rounds, rows_of
from topology.drawn import Rows, local_rows, oracle_rows
from topology.graphs import (
    ONE_PEER_EXPONENTIAL,
    TIME_VARYING,
    TopologyError,
    build_graph,
    positive_int_param,
    split_spec,
)
from topology.walk import base_chain
from topology.weights import mean_spectral_gap, metropolis_hastings, spectral_gap, uniform

WEIGHT_SCHEMES = ("metropolis", "uniform")
DRAWN_ROUNDS_KEPT = 32  # a drawn topology's rounds kept for peers that are a little behind
GAP_DRAWS = 16  # the rounds over which a drawn topology's gap is taken


class _Round:
    """One round's W as rows, with the per-peer views that peers query many times per round;
    the dense matrix is built only when asked for."""

    def __init__(self, rows: Rows) -> None:
        n = len(rows)
        self.rows = rows
        self.in_weights: list[dict[int, float]] = [{} for _ in range(n)]
        self.out_neighbours: list[list[int]] = [[] for _ in range(n)]
        self.self_weights = [row.get(i, 0.0) for i, row in enumerate(rows)]
        for i, row in enumerate(rows):
            for j in sorted(row):
                if i != j and row[j] > 0:
                    self.in_weights[i][j] = float(row[j])
                    self.out_neighbours[j].append(i)  # i ascending, so each out list comes out sorted
        self._matrix: np.ndarray | None = None

    @property
    def matrix(self) -> np.ndarray:
        if self._matrix is None:
            self._matrix = dense(self.rows)
            self._matrix.flags.writeable = False  # shared by every caller, so nobody may edit it
        return self._matrix


def dense(rows: Rows) -> np.ndarray:
    """W as a matrix."""
    matrix = np.zeros((len(rows), len(rows)))
    for i, row in enumerate(rows):
        matrix[i, list(row)] = list(row.values())
    return matrix


def rows_of_matrix(matrix: np.ndarray) -> Rows:
    """W's rows as {j: W[i, j]} over the nonzero entries."""
    return [{int(j): float(row[j]) for j in np.flatnonzero(row)} for row in matrix]


class Topology:
    """Mixing weights per round for n peers; static graphs have period 1.

    Round r uses W(r mod period); each distinct W and its per-peer views are built once. A
    drawn topology (``period`` None) never repeats: round r's W is drawn for r, and the last
    DRAWN_ROUNDS_KEPT rounds are kept. ``graph`` is the fixed graph of a static topology, None
    when the graph changes every round.
    """

    def __init__(
        self,
        spec: str,
        n: int,
        period: int | None,
        rows_for_round: Callable[[int], Rows],
        graph: nx.Graph | None = None,
    ) -> None:
        self.spec = spec
        self.n = n
        self.period = period
        self.graph = graph
        self._rows_for_round = rows_for_round
        self._rounds: OrderedDict[int, _Round] = OrderedDict()
        self._spectral_gap: float | None = None
        self._walk_chains: dict[float, np.ndarray] = {}

    @classmethod
    def fixed(cls, spec: str, matrix: np.ndarray, graph: nx.Graph | None = None) -> Topology:
        """The same W every round."""
        rows = rows_of_matrix(matrix)
        return cls(spec, matrix.shape[0], 1, lambda _round: rows, graph)

    @property
    def time_varying(self) -> bool:
        return self.period != 1

    @property
    def drawn(self) -> bool:
        """Whether each round's graph is drawn afresh (it never repeats)."""
        return self.period is None

    def _round(self, round: int) -> _Round:
        key = round if self.period is None else round % self.period
        cached = self._rounds.get(key)
        if cached is None:
            cached = self._rounds[key] = _Round(self._rows_for_round(key))
            if self.period is None and len(self._rounds) > DRAWN_ROUNDS_KEPT:
                self._rounds.popitem(last=False)
        return cached

    def rows(self, round: int) -> Rows:
        """W(round) as rows: row i maps each j with W[i, j] > 0, i included, to W[i, j]."""
        return self._round(round).rows

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
        """Gap of W; for a time-varying topology, of W(period-1) ... W(0), one full period; for a
        drawn one, the gap in expectation over its first GAP_DRAWS rounds (``mean_spectral_gap``)."""
        if self._spectral_gap is None:
            if self.period is None:
                # Not through the rounds' cache: n x n matrices of rounds long gone need not stay.
                self._spectral_gap = mean_spectral_gap(dense(self._rows_for_round(r)) for r in range(GAP_DRAWS))
            else:
                product = np.eye(self.n)
                for phase in range(self.period):
                    product = self.mixing_matrix(phase) @ product
                self._spectral_gap = spectral_gap(product)
        return self._spectral_gap

    def in_degrees(self, rounds: int) -> list[int]:
        """How many models each peer receives, over every peer and round 0 .. rounds - 1 (over
        one period at most when the rounds repeat)."""
        span = rounds if self.period is None else min(rounds, self.period)
        return [len(weights) for round in range(span) for weights in self._round(round).in_weights]

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
        cut = set(peers)
        if len(cut) < 2:
            return self

        def rows(key: int) -> Rows:
            return [_folded(row, i, cut) if i in cut else row for i, row in enumerate(self.rows(key))]

        graph = None
        if self.graph is not None:
            graph = self.graph.copy()
            graph.remove_edges_from([(i, j) for i in cut for j in cut if graph.has_edge(i, j)])
        return Topology(self.spec, self.n, self.period, rows, graph)

    def __repr__(self) -> str:
        return f"Topology({self.spec!r}, n={self.n}, period={self.period})"


def parse_topology(spec: str, n: int, *, weights: str = "metropolis", seed: int = 0) -> Topology:
    """The Topology that ``spec`` names on n peers (see TOPOLOGY_NAMES).

    ``weights`` is "metropolis" (Metropolis-Hastings) or "uniform" (1 / (in-degree + 1)).
    Directed graphs (``exponential``) have no Metropolis-Hastings weights, so they always
    use uniform ones, which are doubly stochastic there; ``onepeer-exponential`` always uses
    W(k) = (I + S^(2^(k mod tau))) / 2, ``base:K`` its own weights (``topology.base_graph``) and
    ``el-oracle:S``/``el-local:S`` uniform ones over each round's draw (``topology.drawn``).
    ``seed`` drives the random generators and draws.
    """
    if weights not in WEIGHT_SCHEMES:
        raise TopologyError(f"unknown weights {weights!r}; valid: {', '.join(WEIGHT_SCHEMES)}")
    name, params = split_spec(spec)
    if name in TIME_VARYING:
        if n < 2:
            raise TopologyError(f"topology {spec!r} needs at least 2 peers, got {n}")
        return _time_varying(name, params, spec, n, seed)
    graph = build_graph(spec, n, seed)
    scheme = metropolis_hastings if weights == "metropolis" and not graph.is_directed() else uniform
    return Topology.fixed(spec, scheme(graph), graph)


def _time_varying(name: str, params: list[str], spec: str, n: int, seed: int) -> Topology:
    if name == ONE_PEER_EXPONENTIAL:
        return Topology(spec, n, one_peer_exponential_period(n),
                        lambda phase: rows_of_matrix(one_peer_exponential_matrix(n, phase)))
    size = positive_int_param(spec, params[0])
    if name == "base":
        schedule = base_graph_rounds(n, size)
        return Topology(spec, n, len(schedule), lambda phase: rows_of(n, schedule[phase]))
    draw = oracle_rows if name == "el-oracle" else local_rows
    return Topology(spec, n, None, lambda round: draw(n, size, seed, round))


def _folded(row: dict[int, float], peer: int, cut: set[int]) -> dict[int, float]:
    """Row ``peer`` with its weights on ``cut`` moved onto its own."""
    kept = sum(w for j, w in row.items() if j in cut)
    return {j: w for j, w in row.items() if j not in cut} | {peer: kept}


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
