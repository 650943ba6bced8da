"""Mixing matrices for a graph on nodes 0..n-1, and their spectral gap.

Row i of a mixing matrix W is what peer i computes: x_i <- sum_j W[i, j] x_j.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import networkx as nx
import numpy as np

from topology.graphs import TopologyError


def _adjacency(graph: nx.Graph) -> np.ndarray:
    """A[u, v] = 1 for every edge u -> v (both ways for an undirected graph)."""
    return nx.to_numpy_array(graph, nodelist=range(graph.number_of_nodes()), dtype=np.float64)


def metropolis_hastings(graph: nx.Graph) -> np.ndarray:
    """W_ij = 1 / (1 + max(d_i, d_j)) on each edge, W_ii = 1 - sum_j W_ij; undirected only."""
    if graph.is_directed():
        raise TopologyError("Metropolis-Hastings weights need an undirected graph; use uniform")
    adjacency = _adjacency(graph)
    degree = adjacency.sum(axis=1)
    weights = adjacency / (1.0 + np.maximum.outer(degree, degree))
    np.fill_diagonal(weights, 1.0 - weights.sum(axis=1))
    return weights


def uniform(graph: nx.Graph) -> np.ndarray:
    """Row i puts 1 / (in-degree_i + 1) on i and on each peer that sends to i.

    Always row stochastic; doubly stochastic when in- and out-degrees are all equal.
    """
    closed = _adjacency(graph).T + np.eye(graph.number_of_nodes())
    return closed / closed.sum(axis=1, keepdims=True)


def spectral_gap(weights: np.ndarray) -> float:
    """1 - ||P W P||_2 with P = I - 11^T/n: how much one mixing step contracts the distance to
    consensus (W maps consensus to itself, so only the disagreement P x is contracted).

    For a doubly stochastic W this is 1 - ||W - 11^T/n||_2, and for a symmetric one
    1 - max(|lambda_2|, |lambda_n|).
    """
    return mean_spectral_gap([weights])


def mean_spectral_gap(draws: Iterable[np.ndarray]) -> float:
    """1 - sqrt(||E[(P W P)^T (P W P)]||_2) over equally likely W: the contraction of the squared
    distance to consensus in expectation, for graphs drawn afresh each round (with one W, the
    gap of that W). The draws are taken one at a time."""
    second_moment, count = None, 0
    for weights in draws:
        n = weights.shape[0]
        projection = np.eye(n) - 1.0 / n
        step = projection @ weights @ projection
        second_moment = step.T @ step if second_moment is None else second_moment + step.T @ step
        count += 1
    if second_moment is None:
        raise ValueError("no mixing matrix to take a gap of")
    return 1.0 - math.sqrt(max(float(np.linalg.eigvalsh(second_moment / count)[-1]), 0.0))
