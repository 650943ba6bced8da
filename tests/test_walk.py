"""Tests for the self-repellent token's walk: base chain, kernel, visit counts, Topology rows."""

from __future__ import annotations

import math
import random

import networkx as nx
import numpy as np
import pytest

from topology import (
    TopologyError,
    VisitCounts,
    base_chain,
    next_holder,
    parse_topology,
    srrw_probabilities,
    step_size,
)


def odd_ring_with_chords() -> nx.Graph:
    """Non-regular and non-bipartite: a 9-ring with two chords from peer 0 and one from 4."""
    graph = nx.cycle_graph(9)
    graph.add_edges_from([(0, 3), (0, 6), (4, 7)])
    return graph


def walk_frequencies(graph: nx.Graph, alpha: float, hops: int, seed: int) -> tuple[dict[str, float], np.ndarray]:
    """Run the SRRW with gamma_n = 1/(n+1); return its VisitCounts frequencies and the tally of holders."""
    chain = base_chain(graph)
    rows = [{str(j): p for j, p in enumerate(chain[i]) if j == i or p > 0} for i in range(len(chain))]
    counts = VisitCounts.uniform(str(i) for i in range(len(chain)))
    rng = random.Random(seed)
    tally = np.zeros(len(chain))
    holder = "0"
    for hop in range(1, hops + 1):
        holder = next_holder(rows[int(holder)], counts, alpha, rng)
        counts.visit(holder, step_size(hop, 1.0))
        tally[int(holder)] += 1
    return counts.frequencies(), tally


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p - q).sum())


# --- base chain ---------------------------------------------------------------------------


@pytest.mark.parametrize("stay", [0.0, 0.3])
def test_base_chain_is_stochastic_and_symmetric_for_a_uniform_target(stay: float) -> None:
    graph = odd_ring_with_chords()
    chain = base_chain(graph, stay=stay)
    assert (chain >= 0).all()
    np.testing.assert_allclose(chain.sum(axis=1), 1.0, atol=1e-12)
    # Detailed balance with a uniform target is symmetry.
    np.testing.assert_allclose(chain, chain.T, atol=1e-15)
    # Peer 1 (degree 2) proposes 0 (degree 4) half the time and is accepted half of those.
    assert chain[1, 0] == pytest.approx((1 - stay) / 4)
    assert chain[1, 2] == pytest.approx((1 - stay) / 2)
    assert chain[1, 1] == pytest.approx(stay + (1 - stay) / 4)


def test_base_chain_is_the_simple_random_walk_on_a_regular_graph() -> None:
    graph = nx.random_regular_graph(3, 12, seed=4)
    adjacency = nx.to_numpy_array(graph, nodelist=range(12))
    np.testing.assert_array_equal(base_chain(graph), adjacency / 3)


def test_base_chain_has_a_non_uniform_target_as_stationary_distribution() -> None:
    graph = odd_ring_with_chords()
    target = np.arange(1.0, 10.0)
    target /= target.sum()
    chain = base_chain(graph, target=target, stay=0.1)
    np.testing.assert_allclose(chain.sum(axis=1), 1.0, atol=1e-12)
    assert (chain >= 0).all()
    np.testing.assert_allclose(target @ chain, target, atol=1e-15)
    flow = target[:, None] * chain
    np.testing.assert_allclose(flow, flow.T, atol=1e-15)


# 17 neighbours: 1 - 17 * (1/17) rounds to 1e-16, which must not pass for a self-loop.
@pytest.mark.parametrize("graph", [nx.cycle_graph(8), nx.complete_bipartite_graph(17, 17)], ids=["ring", "K17,17"])
def test_bipartite_regular_graph_is_periodic_and_says_what_to_use(graph: nx.Graph) -> None:
    with pytest.raises(TopologyError, match="alternates between the two halves") as error:
        base_chain(graph)
    message = str(error.value)
    assert "\n" not in message
    for hint in ("odd number of peers", "regular:3", "erdos:P", "--srrw-stay"):
        assert hint in message


def test_odd_ring_and_lazy_even_ring_are_aperiodic() -> None:
    odd = base_chain(nx.cycle_graph(7))
    assert odd[0, 1] == odd[0, 6] == 0.5 and odd[0, 0] == 0.0
    lazy = base_chain(nx.cycle_graph(8), stay=0.2)
    assert lazy[0, 0] == pytest.approx(0.2) and lazy[0, 1] == pytest.approx(0.4)


def test_bipartite_graph_with_a_rejecting_peer_is_aperiodic() -> None:
    # A star is bipartite, but the MH walk rejects moves onto the hub often enough to stay put.
    chain = base_chain(nx.star_graph(4))
    assert chain[1, 1] == pytest.approx(3 / 4)


@pytest.mark.parametrize(
    ("kwargs", "graph", "keyword"),
    [
        ({}, nx.DiGraph([(0, 1), (1, 2), (2, 0)]), "undirected"),
        ({"stay": 1.0}, nx.cycle_graph(5), "stays put"),
        ({"stay": -0.1}, nx.cycle_graph(5), "stays put"),
        ({"stay": math.nan}, nx.cycle_graph(5), "stays put"),
        ({"target": np.full(4, 0.25)}, nx.cycle_graph(5), "one probability per peer"),
        ({"target": np.array([0.5, 0.5, 0.0, 0.0, 0.0])}, nx.cycle_graph(5), "positive"),
        ({"target": np.full(5, 0.3)}, nx.cycle_graph(5), "sum to 1"),
        ({}, nx.Graph([(0, 1), (2, 3), (3, 4), (4, 2)]), "connected"),
    ],
)
def test_base_chain_rejects_bad_input_in_one_line(kwargs: dict, graph: nx.Graph, keyword: str) -> None:
    with pytest.raises(TopologyError, match=keyword) as error:
        base_chain(graph, **kwargs)
    assert "\n" not in str(error.value)


# --- kernel -------------------------------------------------------------------------------


def test_alpha_zero_gives_the_base_row() -> None:
    base = np.array([0.0, 0.25, 0.5, 0.25])
    counts = np.log(np.array([0.1, 0.7, 0.05, 0.15]))
    with np.errstate(divide="ignore"):
        log_base = np.log(base)
    probabilities = srrw_probabilities(log_base, counts, 0.0)
    np.testing.assert_allclose(probabilities, base, atol=1e-15)
    assert probabilities[0] == 0.0


@pytest.mark.parametrize("alpha", [0.5, 1.0, 5.0, 20.0])
def test_kernel_row_is_a_distribution_that_favours_the_least_visited(alpha: float) -> None:
    rng = np.random.default_rng(3)
    log_base = np.log(np.full(5, 0.2))
    log_counts = np.log(rng.uniform(0.01, 1.0, 5))
    probabilities = srrw_probabilities(log_base, log_counts, alpha)
    assert (probabilities >= 0).all()
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.argmax(probabilities) == np.argmin(log_counts)
    # Equal base weights: the ratio of two entries is the ratio of their counts to the power -alpha.
    assert probabilities[0] / probabilities[1] == pytest.approx(math.exp(-alpha * (log_counts[0] - log_counts[1])))


def test_kernel_divides_counts_by_the_target() -> None:
    log_base = np.log(np.array([0.5, 0.5]))
    log_counts = np.log(np.array([0.2, 0.8]))
    # Counts in proportion to the target: no peer is over-visited, so the base row is kept.
    log_target = np.log(np.array([0.2, 0.8]))
    np.testing.assert_allclose(srrw_probabilities(log_base, log_counts, 5.0, log_target), [0.5, 0.5])


def test_large_alpha_steers_to_the_least_visited_neighbour() -> None:
    log_base = np.array([-math.inf, math.log(1 / 3), math.log(1 / 3), math.log(1 / 3)])
    log_counts = np.log(np.array([0.01, 1.0, 0.5, 1.0]))
    probabilities = srrw_probabilities(log_base, log_counts, 20.0)
    assert probabilities[2] > 0.99
    assert probabilities[0] == 0.0


def test_large_alpha_does_not_overflow_over_counts_spanning_many_orders() -> None:
    log_counts = np.log(np.logspace(-300, 0, 7))
    log_base = np.log(np.full(7, 1 / 7))
    log_base[3] = -math.inf
    probabilities = srrw_probabilities(log_base, log_counts, 50.0)
    assert np.isfinite(probabilities).all()
    assert probabilities.sum() == pytest.approx(1.0)
    assert probabilities[0] == 1.0 and probabilities[3] == 0.0


@pytest.mark.parametrize(
    ("log_base", "log_counts", "alpha", "keyword"),
    [
        ([0.0], [0.0], -1.0, "alpha"),
        ([0.0], [0.0], math.nan, "alpha"),
        ([0.0, 0.0], [0.0], 1.0, "aligned"),
        ([math.nan], [0.0], 1.0, "log_base"),
        ([-math.inf], [0.0], 1.0, "at least one is positive"),
        ([0.0], [-math.inf], 1.0, "finite"),
        ([0.0, 0.0], [-1e307, 1e307], 50.0, "too far apart"),
    ],
)
def test_kernel_rejects_bad_input(log_base: list, log_counts: list, alpha: float, keyword: str) -> None:
    with pytest.raises(ValueError, match=keyword):
        srrw_probabilities(np.array(log_base), np.array(log_counts), alpha)


def test_large_alpha_breaks_ties_at_random() -> None:
    row = {"a": 0.0, "b": 0.5, "c": 0.5}
    holders = {next_holder(row, VisitCounts.uniform("abc"), 50.0, random.Random(seed)) for seed in range(20)}
    assert holders == {"b", "c"}


def test_next_holder_replays_for_a_seed_and_admits_newcomers_like_their_neighbours() -> None:
    counts = VisitCounts({"a": math.log(1.0), "b": math.log(3.0), "far": math.log(11.0)})
    row = {"a": 0.2, "b": 0.4, "new": 0.4}
    first = [next_holder(row, counts, 2.0, random.Random(7)) for _ in range(3)]
    assert len(set(first)) == 1
    assert counts.log_count("new") == pytest.approx(math.log(2.0))


class FirstDraw(random.Random):
    """A generator whose draw is 0.0, the one value random() can return at the very edge."""

    def random(self) -> float:
        return 0.0


def test_next_holder_never_draws_a_peer_of_probability_zero() -> None:
    assert next_holder({"a": 0.0, "b": 1.0}, VisitCounts.uniform("ab"), 1.0, FirstDraw()) == "b"


# --- walks --------------------------------------------------------------------------------


def test_visit_counts_track_the_empirical_frequencies_of_the_walk() -> None:
    hops = 600
    frequencies, tally = walk_frequencies(odd_ring_with_chords(), 5.0, hops, seed=0)
    # gamma_n = 1/(n+1) from x_0 = 1/9 gives x_n = (1/9 + visits) / (n + 1).
    expected = (1 / 9 + tally) / (hops + 1)
    np.testing.assert_allclose([frequencies[str(i)] for i in range(9)], expected, rtol=1e-9)


def test_walk_converges_to_the_target_and_faster_when_self_repellent() -> None:
    graph = odd_ring_with_chords()
    uniform = np.full(9, 1 / 9)
    distance = {}
    for alpha in (0.0, 5.0):
        distance[alpha] = np.mean(
            [total_variation(walk_frequencies(graph, alpha, 1500, seed)[1] / 1500, uniform) for seed in range(4)]
        )
    # The simple random walk's degree-weighted frequencies would be 0.12 away from uniform.
    assert distance[0.0] < 0.06
    assert distance[5.0] < distance[0.0] / 2


# --- visit counts -------------------------------------------------------------------------


def test_visit_counts_match_the_direct_update() -> None:
    peers = [f"p{i}" for i in range(6)]
    counts = VisitCounts.uniform(peers)
    direct = np.full(6, 1 / 6)
    rng = random.Random(1)
    for hop in range(1, 301):
        visited = rng.randrange(6)
        gamma = step_size(hop, 0.7)
        counts.visit(peers[visited], gamma)
        direct *= 1 - gamma
        direct[visited] += gamma
    frequencies = counts.frequencies()
    np.testing.assert_allclose([frequencies[peer] for peer in peers], direct / direct.sum(), rtol=1e-10)
    assert sum(frequencies.values()) == pytest.approx(1.0)


def test_visit_counts_stay_finite_over_a_million_hops() -> None:
    exponent = 0.51
    # log W_n summed in closed form over the first 10^5 hops agrees with the lazy updates...
    counts = VisitCounts.uniform("abcd")
    for hop in range(1, 100_001):
        counts.visit("abcd"[hop % 4], step_size(hop, exponent))
    hops = np.arange(2.0, 100_002.0)
    assert counts.log_scale == pytest.approx(float(-np.log1p(-(hops**-exponent)).sum()), rel=1e-9)
    # ...so the walk resumes at hop 10^6 from the closed form, where W_n is far beyond a float.
    hops = np.arange(2.0, 1_000_002.0)
    log_scale = float(-np.log1p(-(hops**-exponent)).sum())
    assert log_scale > math.log(np.finfo(np.float64).max)
    counts = VisitCounts({peer: log_scale - math.log(4) for peer in "abcd"}, log_scale)
    for hop in range(1_000_001, 1_001_001):
        counts.visit("a", step_size(hop, exponent))
    assert math.isfinite(counts.log_scale)
    assert all(math.isfinite(value) for value in counts.log_counts.values())
    frequencies = counts.frequencies()
    assert frequencies["a"] > 0.25 and frequencies["b"] == pytest.approx(frequencies["c"])


def test_admit_seeds_a_newcomer_at_its_neighbours_mean() -> None:
    counts = VisitCounts({"a": math.log(1.0), "b": math.log(3.0), "c": math.log(11.0)})
    counts.admit("new", ["a", "b", "unknown"])
    assert counts.log_count("new") == pytest.approx(math.log(2.0))
    counts.admit("stranger", ["unknown"])
    assert counts.log_count("stranger") == pytest.approx(math.log((1 + 3 + 11 + 2) / 4))
    counts.admit("a", ["c"])
    assert counts.log_count("a") == pytest.approx(0.0)


def test_visit_admits_an_unknown_peer_before_counting_it() -> None:
    counts = VisitCounts.uniform("ab")
    counts.visit("c", 0.5)
    assert set(counts.frequencies()) == {"a", "b", "c"}
    # Seeded at the mean 1/2, then halved with the rest and given the visit's 1/2.
    assert counts.frequencies()["c"] == pytest.approx((0.25 + 0.5) / 1.25)


@pytest.mark.parametrize("gamma", [0.0, 1.0, -0.1, math.nan])
def test_visit_rejects_a_step_size_outside_zero_one(gamma: float) -> None:
    with pytest.raises(ValueError, match="gamma"):
        VisitCounts.uniform("ab").visit("a", gamma)


@pytest.mark.parametrize(
    ("log_counts", "log_scale"), [({}, 0.0), ({"a": -math.inf}, 0.0), ({"a": math.nan}, 0.0), ({"a": 0.0}, math.inf)]
)
def test_visit_counts_refuse_values_that_are_not_finite(log_counts: dict, log_scale: float) -> None:
    with pytest.raises(ValueError):
        VisitCounts(log_counts, log_scale)


def test_step_size_counts_moves_from_one() -> None:
    assert step_size(1, 1.0) == 0.5
    assert step_size(3, 0.5) == 0.5
    with pytest.raises(ValueError, match="from 1"):
        step_size(0, 0.8)


# --- Topology -----------------------------------------------------------------------------


def test_walk_row_on_an_odd_ring() -> None:
    topology = parse_topology("ring", 5)
    for i in range(5):
        assert topology.walk_row(i) == {(i - 1) % 5: 0.5, i: 0.0, (i + 1) % 5: 0.5}
    assert topology.walk_row(2, stay=0.5) == {1: 0.25, 2: 0.5, 3: 0.25}


def test_walk_row_refuses_an_even_ring_unless_the_token_may_stay() -> None:
    topology = parse_topology("ring", 6)
    with pytest.raises(TopologyError, match="--srrw-stay"):
        topology.walk_row(0)
    assert topology.walk_row(0, stay=0.2) == pytest.approx({5: 0.4, 0: 0.2, 1: 0.4})


@pytest.mark.parametrize(("spec", "keyword"), [("onepeer-exponential", "fixed graph"), ("exponential", "undirected")])
def test_walk_row_refuses_topologies_the_token_cannot_walk(spec: str, keyword: str) -> None:
    with pytest.raises(TopologyError, match=keyword):
        parse_topology(spec, 8).walk_row(0)
