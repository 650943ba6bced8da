"""The random walk of a self-repellent token: its base chain, its kernel and its visit counts.

A token walks the graph; the walk is pushed away from the peers it has visited often
(SRRW: Doshi, Hu, Eun, ICML 2023). Everything here is a pure function of its arguments.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

import networkx as nx
import numpy as np

from topology.graphs import TopologyError
from topology.weights import _adjacency

# How far a target may stray from summing to one before it is not a distribution.
_TARGET_SUM_TOLERANCE = 1e-9


def base_chain(graph: nx.Graph, *, target: np.ndarray | None = None, stay: float = 0.0) -> np.ndarray:
    """The Metropolis-Hastings walk on peers 0..n-1 whose stationary distribution is ``target``.

    P_ij = min(1/d_i, target_j / (target_i d_j)) for each neighbour j, P_ii the rest of the row;
    then stay * I + (1 - stay) * P, a lazy chain with the same stationary distribution.
    ``target`` defaults to uniform. Refuses graphs on which the walk would be periodic.
    """
    if graph.is_directed():
        raise TopologyError(
            "the token's walk needs an undirected graph and this one is directed (e.g. exponential); "
            "use ring, regular:D, erdos:P or another undirected topology"
        )
    n = graph.number_of_nodes()
    if n < 2 or not nx.is_connected(graph):
        raise TopologyError(
            "the token can only walk a connected graph of at least 2 peers; add peers or edges"
        )
    if not 0.0 <= stay < 1.0:
        raise TopologyError(f"the probability that the token stays put must be in [0, 1), got {stay}")
    target = _checked_target(target, n)
    adjacency = _adjacency(graph)
    inverse_degree = 1.0 / adjacency.sum(axis=1)
    proposal = adjacency * inverse_degree[:, None]
    accepted = adjacency * np.minimum(
        inverse_degree[:, None], np.outer(1.0 / target, target) * inverse_degree[None, :]
    )
    chain = accepted.copy()
    # P_ii is the rejected proposal mass rather than 1 - sum_j P_ij: it is then exactly zero when
    # nothing is rejected (a regular graph), so the periodicity check below sees a true zero.
    np.fill_diagonal(chain, (proposal - accepted).sum(axis=1))
    chain = stay * np.eye(n) + (1.0 - stay) * chain
    if nx.is_bipartite(graph) and not chain.diagonal().any():
        raise TopologyError(
            "the token's walk is periodic on this bipartite graph (e.g. a ring of an even number of "
            "peers): the token alternates between the two halves of the graph and its visit "
            "frequencies never settle; use an odd number of peers on a ring, a non-bipartite "
            "topology such as regular:3 or erdos:P, or --srrw-stay P with P > 0 so the token "
            "sometimes stays put"
        )
    return chain


def _checked_target(target: np.ndarray | None, n: int) -> np.ndarray:
    if target is None:
        return np.full(n, 1.0 / n)
    target = np.asarray(target, dtype=np.float64)
    if target.shape != (n,):
        raise TopologyError(f"the walk's target needs one probability per peer ({n}), got shape {target.shape}")
    if not (np.isfinite(target).all() and (target > 0).all()):
        raise TopologyError("the walk's target must be positive for every peer so that each is visited")
    if abs(target.sum() - 1.0) > _TARGET_SUM_TOLERANCE:
        raise TopologyError(f"the walk's target must sum to 1, got {target.sum()}; divide it by its sum")
    return target


def srrw_probabilities(
    log_base: np.ndarray, log_counts: np.ndarray, alpha: float, log_target: np.ndarray | None = None
) -> np.ndarray:
    """One row of the SRRW kernel over the holder's closed neighbourhood (aligned arrays).

    K_j is proportional to P_ij (x_j / mu_j)^(-alpha). The weights span 2^(alpha * many) so they
    are only ever formed as log-weights less their maximum. Entries with log_base = -inf
    (P_ij = 0) get probability exactly 0; ``log_target`` None means uniform, which cancels.
    """
    if not 0.0 <= alpha < math.inf:
        raise ValueError(f"the self-repellence alpha must be a finite number >= 0, got {alpha}")
    log_base = np.asarray(log_base, dtype=np.float64)
    log_counts = np.asarray(log_counts, dtype=np.float64)
    if log_base.shape != log_counts.shape or log_base.ndim != 1:
        raise ValueError(f"log_base {log_base.shape} and log_counts {log_counts.shape} must be aligned rows")
    if np.isnan(log_base).any() or (log_base == math.inf).any() or (log_base == -math.inf).all():
        raise ValueError("log_base must hold logs of probabilities of which at least one is positive")
    if not np.isfinite(log_counts).all():
        raise ValueError("log_counts must be finite: every peer the token may visit needs a positive count")
    repulsion = log_counts
    if log_target is not None:
        log_target = np.asarray(log_target, dtype=np.float64)
        if log_target.shape != log_base.shape or not np.isfinite(log_target).all():
            raise ValueError("log_target must be finite and aligned with log_base")
        repulsion = log_counts - log_target
    # Finite counts keep an unreachable peer's logit at -inf, hence at probability exactly 0.
    with np.errstate(over="ignore"):  # an overflow is reported just below, in words
        logits = log_base - alpha * repulsion
    if not math.isfinite(logits.max()):
        raise ValueError("the log counts are too far apart for this alpha: alpha times their spread overflows")
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def step_size(visit: int, exponent: float) -> float:
    """(visit + 1)^(-exponent) for the visit-th move of the token (visit >= 1)."""
    if visit < 1:
        raise ValueError(f"the token's moves are counted from 1, got {visit}")
    return (visit + 1) ** -exponent


def _logaddexp(a: float, b: float) -> float:
    # math rather than numpy: this runs once per hop on plain floats.
    high, low = (a, b) if a >= b else (b, a)
    return high + math.log1p(math.exp(low - high))


def _logsumexp(values: Iterable[float]) -> float:
    values = list(values)
    high = max(values)
    return high + math.log(math.fsum(math.exp(value - high) for value in values))


class VisitCounts:
    """The empirical visit measure x of one token's walk, as lazy weighted counts in log space.

    x_j = c_j / sum_k c_k. A visit at hop n scales x by (1 - gamma_n) and adds gamma_n to the
    visited peer; instead of touching every peer, the counts stay put and the visit adds
    gamma_n W_n, with W_n = prod_{t<=n} (1 - gamma_t)^-1 kept as log_scale.
    """

    def __init__(self, log_counts: dict[str, float], log_scale: float = 0.0) -> None:
        if not log_counts:
            raise ValueError("visit counts need at least one peer")
        if not all(math.isfinite(value) for value in log_counts.values()):
            raise ValueError("every log count must be finite (a count of zero would capture the walk)")
        if not math.isfinite(log_scale):
            raise ValueError(f"the log scale of the visit counts must be finite, got {log_scale}")
        self.log_counts = dict(log_counts)
        self.log_scale = log_scale

    @classmethod
    def uniform(cls, peers: Iterable[str]) -> VisitCounts:
        """x_j = 1/n for each of the n peers: every peer counts as visited once."""
        peers = list(peers)
        if not peers:
            raise ValueError("visit counts need at least one peer")
        return cls({peer: -math.log(len(peers)) for peer in peers})

    def visit(self, peer: str, gamma: float) -> None:
        """x <- (1 - gamma) x + gamma e_peer, in O(1); an unknown peer is admitted first."""
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"the visit step size gamma must be in (0, 1), got {gamma}")
        self.admit(peer, ())
        self.log_scale -= math.log1p(-gamma)
        self.log_counts[peer] = _logaddexp(self.log_counts[peer], math.log(gamma) + self.log_scale)

    def admit(self, peer: str, like: Iterable[str]) -> None:
        """Seed a newcomer at the mean count of the known peers in ``like`` (else of all known peers).

        A count near zero would let the newcomer capture the walk, a huge one would shun it.
        """
        if peer in self.log_counts:
            return
        known = [self.log_counts[other] for other in like if other in self.log_counts]
        if not known:
            known = list(self.log_counts.values())
        self.log_counts[peer] = _logsumexp(known) - math.log(len(known))

    def log_count(self, peer: str) -> float:
        return self.log_counts[peer]

    def frequencies(self) -> dict[str, float]:
        """The normalised x: sums to one."""
        total = _logsumexp(self.log_counts.values())
        return {peer: math.exp(value - total) for peer, value in self.log_counts.items()}


def next_holder(base_row: dict[str, float], counts: VisitCounts, alpha: float, rng: random.Random) -> str:
    """Draw the token's next holder from the SRRW kernel over ``base_row``'s peers.

    ``base_row`` is the base chain's row from the holder, the holder included. Peers the counts
    do not know are admitted like the rest of the row. Peers are taken in sorted order and
    rng.random() is drawn once, so a run replays for a seed; ties fall to that draw.
    """
    peers = sorted(base_row)
    if not all(0.0 <= base_row[peer] <= 1.0 for peer in peers):
        raise ValueError("the base chain's row must hold probabilities in [0, 1]")
    for peer in peers:
        counts.admit(peer, (other for other in peers if other != peer))
    log_base = np.array([math.log(base_row[peer]) if base_row[peer] > 0 else -math.inf for peer in peers])
    log_counts = np.array([counts.log_count(peer) for peer in peers])
    probabilities = srrw_probabilities(log_base, log_counts, alpha)
    cumulative = np.cumsum(probabilities)
    # side="right" never lands on a zero-probability entry; rounding can leave the total just
    # under a draw, and then the last reachable peer takes it.
    index = int(np.searchsorted(cumulative, rng.random(), side="right"))
    if index == len(peers):
        index = int(np.flatnonzero(probabilities)[-1])
    return peers[index]
