"""Tests for topology: the generators, the mixing-weight math and the round schedule."""

from __future__ import annotations

import math
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import gossip_round
from topology import (
    TOPOLOGY_NAMES,
    TopologyError,
    metropolis_hastings,
    parse_topology,
    spectral_gap,
    uniform,
)
from topology.graphs import build_graph

# Specs that are valid for the n used with them below.
UNDIRECTED_SPECS = [
    "ring", "torus", "complete", "star", "regular:4", "erdos:0.5", "smallworld:4:0.2"
]
STATIC_SPECS = UNDIRECTED_SPECS + ["exponential"]
POWERS_OF_TWO = [2, 4, 8, 16, 32]


def assert_row_stochastic(matrix: np.ndarray) -> None:
    assert matrix.dtype == np.float64
    assert (matrix >= 0).all()
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)


def assert_doubly_stochastic(matrix: np.ndarray) -> None:
    assert_row_stochastic(matrix)
    np.testing.assert_allclose(matrix.sum(axis=0), 1.0, atol=1e-12)


def average_matrix(n: int) -> np.ndarray:
    return np.full((n, n), 1.0 / n)


# --- weights on every generator ---------------------------------------------------------


@pytest.mark.parametrize("spec", STATIC_SPECS)
@pytest.mark.parametrize("weights", ["metropolis", "uniform"])
def test_static_weights_are_row_stochastic(spec: str, weights: str) -> None:
    topology = parse_topology(spec, 16, weights=weights, seed=1)
    assert topology.period == 1 and not topology.time_varying
    assert_row_stochastic(topology.mixing_matrix(0))


@settings(max_examples=25, deadline=None)
@given(
    spec=st.sampled_from(UNDIRECTED_SPECS),
    n=st.integers(min_value=9, max_value=40),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_metropolis_hastings_is_symmetric_and_doubly_stochastic(
    spec: str, n: int, seed: int
) -> None:
    try:
        graph = build_graph(spec, n, seed)
    except TopologyError:
        return  # torus with no r x c shape, odd n * D, or an unlucky random draw
    matrix = metropolis_hastings(graph)
    np.testing.assert_array_equal(matrix, matrix.T)
    assert_doubly_stochastic(matrix)
    for i, j in graph.edges:
        assert matrix[i, j] == 1.0 / (1 + max(graph.degree[i], graph.degree[j]))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(min_value=5, max_value=30), seed=st.integers(min_value=0, max_value=2**16))
def test_uniform_weights_are_doubly_stochastic_on_regular_graphs(n: int, seed: int) -> None:
    for spec in ["ring", "complete", "regular:4", "torus"]:
        try:
            graph = build_graph(spec, n, seed)
        except TopologyError:
            continue  # torus with no r x c shape, or an unlucky random draw
        assert_doubly_stochastic(uniform(graph))


def test_uniform_weights_on_a_star_are_not_doubly_stochastic() -> None:
    matrix = uniform(build_graph("star", 6))
    assert_row_stochastic(matrix)
    assert matrix[0, 0] == pytest.approx(1 / 6) and matrix[1, 1] == pytest.approx(1 / 2)
    assert not np.allclose(matrix.sum(axis=0), 1.0)


def test_metropolis_hastings_refuses_directed_graphs() -> None:
    with pytest.raises(TopologyError, match="undirected"):
        metropolis_hastings(build_graph("exponential", 8))


# --- spectral gap -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 5, 17])
def test_complete_graph_mixes_in_one_step(n: int) -> None:
    topology = parse_topology("complete", n)
    np.testing.assert_allclose(topology.mixing_matrix(0), average_matrix(n), atol=1e-15)
    assert topology.spectral_gap() == pytest.approx(1.0)


@pytest.mark.parametrize("n", [3, 4, 7, 10, 25])
def test_ring_spectral_gap_matches_closed_form(n: int) -> None:
    matrix = metropolis_hastings(build_graph("ring", n))
    np.testing.assert_allclose(matrix[matrix > 0], 1 / 3)
    expected = 1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / n))
    assert spectral_gap(matrix) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("spec", UNDIRECTED_SPECS)
def test_spectral_gap_equals_second_largest_eigenvalue_modulus(spec: str) -> None:
    matrix = metropolis_hastings(build_graph(spec, 16, seed=3))
    eigenvalues = np.sort(np.linalg.eigvalsh(matrix))[::-1]
    assert eigenvalues[0] == pytest.approx(1.0)
    rho = max(abs(eigenvalues[1]), abs(eigenvalues[-1]))
    assert spectral_gap(matrix) == pytest.approx(1 - rho, abs=1e-12)
    assert 0 < spectral_gap(matrix) <= 1


# --- the exponential graphs -------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 8, 13, 32])
def test_static_exponential_links_powers_of_two_with_doubly_stochastic_weights(n: int) -> None:
    graph = build_graph("exponential", n)
    assert graph.is_directed()
    hops = [2**k for k in range(math.floor(math.log2(n - 1)) + 1)]
    assert set(graph.successors(0)) == {hop % n for hop in hops}
    topology = parse_topology("exponential", n, weights="metropolis")  # quietly uniform
    matrix = topology.mixing_matrix(0)
    assert_doubly_stochastic(matrix)
    np.testing.assert_allclose(matrix[matrix > 0], 1 / (len(hops) + 1))


@pytest.mark.parametrize("n", POWERS_OF_TWO)
def test_one_peer_exponential_product_of_a_period_is_the_exact_average(n: int) -> None:
    topology = parse_topology("onepeer-exponential", n)
    tau = int(math.log2(n))
    assert topology.period == tau and topology.time_varying == (tau > 1)
    for start in range(2 * tau):
        product = np.eye(n)
        for round in range(start, start + tau):
            matrix = topology.mixing_matrix(round)
            assert_doubly_stochastic(matrix)
            product = matrix @ product
        np.testing.assert_allclose(product, average_matrix(n), rtol=0, atol=1e-12)
    assert topology.spectral_gap() == pytest.approx(1.0)


@pytest.mark.parametrize("n", POWERS_OF_TWO)
def test_one_peer_exponential_peers_reach_the_exact_average(n: int) -> None:
    topology = parse_topology("onepeer-exponential", n)
    values = np.random.default_rng(n).normal(size=(n, 3))
    mixed = values
    for round in range(5, 5 + int(math.log2(n))):
        assert all(len(topology.in_weights(peer, round)) == 1 for peer in range(n))
        mixed = gossip_round(topology, mixed, round)
    np.testing.assert_allclose(mixed, np.broadcast_to(values.mean(axis=0), mixed.shape), atol=1e-12)


@pytest.mark.parametrize("n", [3, 6, 12, 100])
def test_one_peer_exponential_follows_the_schedule_for_any_n(n: int) -> None:
    topology = parse_topology("onepeer-exponential", n)
    tau = math.ceil(math.log2(n))
    assert topology.period == tau
    for round in range(2 * tau):
        hop = 2 ** (round % tau)
        assert topology.in_weights(7 % n, round) == {(7 - hop) % n: 0.5}
        assert topology.out_neighbours(7 % n, round) == [(7 + hop) % n]
        assert topology.self_weight(7 % n, round) == 0.5
        assert_doubly_stochastic(topology.mixing_matrix(round))
    assert 0 < topology.spectral_gap() < 1


# --- per-peer views ---------------------------------------------------------------------


@pytest.mark.parametrize("spec", STATIC_SPECS + ["onepeer-exponential"])
def test_in_weights_and_out_neighbours_agree_with_the_matrix(spec: str) -> None:
    topology = parse_topology(spec, 16, seed=2)
    for round in range(topology.period + 1):
        matrix = topology.mixing_matrix(round)
        for i in range(16):
            incoming = topology.in_weights(i, round)
            assert topology.self_weight(i, round) == matrix[i, i]
            assert incoming == {j: matrix[i, j] for j in range(16) if j != i and matrix[i, j] > 0}
            outgoing = topology.out_neighbours(i, round)
            assert outgoing == sorted(outgoing)
            for j in range(16):
                assert (j in outgoing) == (i in topology.in_weights(j, round))


def test_views_are_cached_and_safe_to_modify() -> None:
    topology = parse_topology("onepeer-exponential", 8)
    assert topology.mixing_matrix(1) is topology.mixing_matrix(1 + topology.period)
    with pytest.raises(ValueError):
        topology.mixing_matrix(0)[0, 0] = 1.0
    topology.in_weights(0, 0).clear()
    topology.out_neighbours(0, 0).clear()
    assert topology.in_weights(0, 0) and topology.out_neighbours(0, 0)
    with pytest.raises(IndexError):
        topology.in_weights(-1, 0)


# --- generators -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "shape"), [(9, (3, 3)), (12, (3, 4)), (16, (4, 4)), (30, (5, 6)), (49, (7, 7))]
)
def test_torus_is_four_regular_with_n_peers(n: int, shape: tuple[int, int]) -> None:
    graph = build_graph("torus", n)
    assert sorted(graph.nodes) == list(range(n))
    assert {degree for _, degree in graph.degree} == {4}
    assert graph.number_of_edges() == 2 * n
    rows, cols = shape
    # Peer 0 wraps around both the row and the column.
    assert graph.has_edge(0, cols) and graph.has_edge(0, cols - 1)
    assert graph.has_edge(0, (rows - 1) * cols)


@pytest.mark.parametrize(("n", "keyword"), [(7, "prime"), (8, "r x c"), (4, "r x c")])
def test_torus_without_a_shape_says_why_and_what_to_use(n: int, keyword: str) -> None:
    with pytest.raises(TopologyError, match=keyword) as error:
        build_graph("torus", n)
    assert "ring" in str(error.value)


def test_star_hub_is_peer_zero() -> None:
    graph = build_graph("star", 10)
    assert graph.degree[0] == 9
    assert all(graph.degree[i] == 1 for i in range(1, 10))


@pytest.mark.parametrize("spec", ["regular:3", "erdos:0.3", "smallworld:4:0.5"])
def test_random_generators_follow_the_seed(spec: str) -> None:
    def edges(seed: int) -> set[tuple[int, int]]:
        return set(build_graph(spec, 20, seed).edges)

    assert edges(5) == edges(5)
    assert edges(5) != edges(6)


def test_regular_graph_has_the_requested_degree() -> None:
    graph = build_graph("regular:5", 12, seed=4)
    assert {degree for _, degree in graph.degree} == {5}


def test_erdos_with_tiny_p_is_disconnected() -> None:
    with pytest.raises(TopologyError, match="disconnected") as error:
        build_graph("erdos:0.01", 16, seed=0)
    assert "raise P" in str(error.value) and "seed" in str(error.value)


# --- file: edge lists -------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "edges.txt"
    path.write_text(text)
    return str(path)


def test_edge_list_round_trip(tmp_path: Path) -> None:
    original = build_graph("regular:3", 10, seed=7)
    lines = ["# a random 3-regular graph", ""] + [f"{u} {v}  # edge" for u, v in original.edges]
    path = write(tmp_path, "\n".join(lines) + "\n")
    topology = parse_topology(f"file:{path}", 10)
    loaded = build_graph(f"file:{path}", 10)
    assert nx.utils.graphs_equal(nx.Graph(loaded.edges), nx.Graph(original.edges))
    np.testing.assert_array_equal(topology.mixing_matrix(0), metropolis_hastings(original))


@pytest.mark.parametrize(
    ("text", "keywords"),
    [
        ("0 1\n1 2 3\n", [":2:", "two node ids"]),
        ("0 1\n1 x\n", [":2:", "integers"]),
        ("0 1\n1 2\n2 3\n3 4\n", [":4:", "outside 0..3"]),
        ("0 1\n1 1\n", [":2:", "self-loop"]),
        ("0 1\n1 2\n", ["exactly 0..3", "3 never appear"]),
        ("0 1\n2 3\n", ["disconnected", "add edges"]),
    ],
)
def test_edge_list_errors_name_the_file_and_the_problem(
    tmp_path: Path, text: str, keywords: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(TopologyError) as error:
        parse_topology(f"file:{path}", 4)
    assert "edges.txt" in str(error.value)
    for keyword in keywords:
        assert keyword in str(error.value)


def test_missing_edge_list_is_reported(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read edge list .*nothere.txt"):
        parse_topology(f"file:{tmp_path / 'nothere.txt'}", 4)


# --- bad specs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "n", "keyword"),
    [
        ("hypercube", 8, "valid names"),
        ("ring:3", 8, "takes 0"),
        ("erdos", 8, "use erdos:P"),
        ("smallworld:4", 8, "smallworld:K:P"),
        ("regular:four", 8, "integer"),
        ("erdos:lots", 8, "number"),
        ("regular:8", 8, "D must be"),
        ("regular:0", 8, "D must be"),
        ("regular:3", 9, "even"),
        ("erdos:0", 8, "(0, 1]"),
        ("erdos:1.5", 8, "(0, 1]"),
        ("erdos:nan", 8, "(0, 1]"),
        ("smallworld:3:0.1", 8, "even"),
        ("smallworld:4:2", 8, "[0, 1]"),
        ("ring", 1, "at least 2 peers"),
        ("onepeer-exponential", 1, "at least 2 peers"),
        ("onepeer-exponential:2", 8, "takes 0"),
        ("file:", 8, "file:PATH"),
    ],
)
def test_bad_specs_raise_helpful_errors(spec: str, n: int, keyword: str) -> None:
    with pytest.raises(TopologyError) as error:
        parse_topology(spec, n)
    assert keyword in str(error.value)
    assert isinstance(error.value, ValueError)


def test_unknown_weights_are_rejected() -> None:
    with pytest.raises(TopologyError, match="metropolis, uniform"):
        parse_topology("ring", 8, weights="max-degree")


def test_every_listed_name_parses() -> None:
    examples = {
        "regular:D": "regular:4", "erdos:P": "erdos:0.9", "smallworld:K:P": "smallworld:4:0.1",
        "base:K": "base:2", "el-oracle:S": "el-oracle:3", "el-local:S": "el-local:3",
    }
    for name in TOPOLOGY_NAMES:
        if name == "file:PATH":
            continue
        topology = parse_topology(examples.get(name, name), 16)
        assert topology.n == 16 and topology.spec == examples.get(name, name)
