"""Mixing matrices for a graph on nodes 0..n-1, and their spectral gap.

Row i of a mixing matrix W is what peer i computes: x_i <- sum_j W[i, j] x_j.
"""

from __future__ import annotations

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
    """1 - ||W - 11^T/n||_2: how much one mixing step contracts the distance to consensus.

    For a symmetric doubly stochastic W this is 1 - max(|lambda_2|, |lambda_n|).
    """
    n = weights.shape[0]
    return 1.0 - float(np.linalg.norm(weights - 1.0 / n, ord=2))
