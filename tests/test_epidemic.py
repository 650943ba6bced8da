"""Overlays that change every round: epidemic draws (el-oracle, el-local), Base-(k+1) graphs, and
attackers on them."""

import asyncio
import json

import numpy as np
import pytest
import torch

from gossip.neighbourhood import GraphNeighbourhood
from peer.cli import main
from peer.config import SimulationConfig, SwarmConfig
from peer.sim.byzantine import ByzantineError, choose_victims, parse_byzantine, targeted_topology
from peer.simulate import peer_ids, simulate
from tests.helpers import gossip_round
from tests.sim_swarm import build_gossip, run
from topology import TopologyError, parse_topology
from topology.base_graph import base_graph_rounds
from topology.drawn import local_recipients, oracle_recipients
from topology.schedule import DRAWN_ROUNDS_KEPT
from topology.weights import mean_spectral_gap, spectral_gap

# --- Base-(k+1) graphs ------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_base_graph_models_equal_their_mean_after_one_period_for_2_to_64_peers(k):
    for n in range(2, 65):
        topology = parse_topology(f"base:{k}", n)
        values = np.random.default_rng(n).normal(size=(n, 4))
        mixed = values
        for round in range(topology.period):
            mixed = gossip_round(topology, mixed, round)
        np.testing.assert_allclose(mixed, np.broadcast_to(values.mean(axis=0), mixed.shape), rtol=0, atol=1e-6)
        assert np.abs(mixed - values.mean(axis=0)).max() < 1e-12, n


@pytest.mark.parametrize("k", [1, 2, 4])
def test_base_graph_rounds_give_each_peer_at_most_k_neighbours_with_symmetric_doubly_stochastic_weights(k):
    for n in range(2, 65):
        topology = parse_topology(f"base:{k}", n)
        for round in range(topology.period):
            matrix = topology.mixing_matrix(round)
            np.testing.assert_allclose(matrix, matrix.T, atol=1e-15)
            np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)
            assert (matrix >= 0).all()
            assert max(len(topology.in_weights(peer, round)) for peer in range(n)) <= k


def test_base_graph_of_a_power_of_k_plus_1_is_its_hyper_hypercube():
    # 8 = 2 x 2 x 2 peers with one neighbour each: three rounds of pairs, as the exponential graph would.
    assert len(base_graph_rounds(8, 1)) == 3
    # 12 = 4 x 3 with at most 3 neighbours: two rounds of cliques.
    assert len(base_graph_rounds(12, 3)) == 2
    assert parse_topology("base:1", 8).spectral_gap() == pytest.approx(1.0)


def test_base_graph_of_5_peers_with_one_neighbour_merges_the_leftover_peer():
    # 5 = 4 + 1: the four reach their mean in two rounds of pairs; then peer 4 meets peer 0 with weight
    # 4/5 on the link (and holds the mean); then the four average again in two rounds of pairs.
    rounds = parse_topology("base:1", 5)
    assert rounds.period == 5
    assert rounds.in_weights(4, 2) == {0: pytest.approx(4 / 5)}
    assert rounds.self_weight(4, 2) == pytest.approx(1 / 5)


# --- drawn overlays ---------------------------------------------------------------------


def test_el_oracle_gives_every_peer_s_recipients_and_s_senders_with_weights_one_over_s_plus_one():
    topology = parse_topology("el-oracle:3", 10, seed=4)
    for round in range(5):
        for peer in range(10):
            assert len(topology.out_neighbours(peer, round)) == 3
            assert peer not in topology.out_neighbours(peer, round)
            assert topology.in_weights(peer, round) == dict.fromkeys(topology.in_weights(peer, round), 0.25)
            assert len(topology.in_weights(peer, round)) == 3
            assert topology.self_weight(peer, round) == 0.25
        np.testing.assert_allclose(topology.mixing_matrix(round).sum(axis=0), 1.0)


def test_el_local_peers_push_to_the_s_peers_they_draw_and_receivers_average_what_came():
    topology = parse_topology("el-local:2", 8, seed=1)
    for round in range(4):
        for peer in range(8):
            assert topology.out_neighbours(peer, round) == local_recipients(8, 2, 1, round, peer)
            senders = [j for j in range(8) if peer in local_recipients(8, 2, 1, round, j)]
            share = 1 / (1 + len(senders))
            assert topology.in_weights(peer, round) == dict.fromkeys(senders, share)
            assert topology.self_weight(peer, round) == share
    degrees = topology.in_degrees(50)
    assert len(degrees) == 8 * 50 and np.mean(degrees) == 2 and len(set(degrees)) > 2


@pytest.mark.parametrize("spec", ["el-oracle:3", "el-local:3"])
def test_a_draw_replays_exactly_for_a_seed_and_changes_every_round(spec):
    first, again = parse_topology(spec, 12, seed=7), parse_topology(spec, 12, seed=7)
    other_seed = parse_topology(spec, 12, seed=8)
    late = [again.out_neighbours(p, 3) for p in range(12)]  # asked in another order, later
    assert [first.out_neighbours(p, 3) for p in range(12)] == late
    assert [first.out_neighbours(p, 3) for p in range(12)] != [first.out_neighbours(p, 4) for p in range(12)]
    assert [first.out_neighbours(p, 3) for p in range(12)] != [other_seed.out_neighbours(p, 3) for p in range(12)]
    assert first.period is None and first.drawn and first.graph is None


def test_a_round_drawn_again_after_it_was_forgotten_is_the_same_draw():
    topology = parse_topology("el-local:2", 6, seed=3)
    before = [topology.out_neighbours(p, 0) for p in range(6)]
    for round in range(1, DRAWN_ROUNDS_KEPT + 2):
        topology.out_neighbours(0, round)
    assert len(topology._rounds) == DRAWN_ROUNDS_KEPT
    assert [topology.out_neighbours(p, 0) for p in range(6)] == before


def test_s_of_at_least_n_minus_1_is_everybody():
    assert oracle_recipients(4, 5, 0, 0) == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    assert local_recipients(4, 3, 0, 9, 2) == [0, 1, 3]


@pytest.mark.parametrize(
    ("spec", "reason"),
    [("el-local:0", "S must be at least 1"), ("el-oracle:x", "S must be an integer"), ("base:0", "K must be at least 1"),
     ("el-local", "takes 1")],
)
def test_a_bad_drawn_or_base_spec_says_what_is_wrong(spec, reason):
    with pytest.raises(TopologyError, match=reason):
        parse_topology(spec, 8)


def test_the_gap_of_a_drawn_overlay_is_in_expectation_over_draws_and_one_w_gives_its_own_gap():
    ring = parse_topology("ring", 8)
    assert mean_spectral_gap([ring.mixing_matrix(0)]) == pytest.approx(spectral_gap(ring.mixing_matrix(0)))
    assert parse_topology("el-oracle:3", 32).spectral_gap() > parse_topology("regular:3", 32).spectral_gap()


def test_a_neighbourhood_on_a_drawn_overlay_is_linked_only_to_that_steps_peers():
    topology = parse_topology("el-local:2", 8, seed=0)
    ids = peer_ids(8)
    neighbourhood = GraphNeighbourhood(topology, ids, ids[0])
    for step in range(3):
        expected = {ids[j] for j in topology.out_neighbours(0, step)} | {ids[j] for j in topology.in_weights(0, step)}
        assert neighbourhood.linked(step) == expected


# --- settings ---------------------------------------------------------------------------


def test_error_feedback_on_a_drawn_overlay_is_refused_and_a_lossy_codec_runs_without_it():
    with pytest.raises(ValueError, match="draws new links every round"):
        SimulationConfig(topology="el-local:3", codec="int8", error_feedback="choco")
    assert SimulationConfig(topology="el-local:3", codec="int8").gossip.error_feedback == "none"
    assert SimulationConfig(topology="base:1", codec="int8").gossip.error_feedback == "choco"


def test_asynchronous_gossip_refuses_a_drawn_overlay_and_takes_a_base_graph():
    with pytest.raises(ValueError, match="peers without rounds are at different steps"):
        SimulationConfig(algorithm="async-gossip", topology="el-oracle:3")
    assert SimulationConfig(algorithm="async-gossip", topology="base:2").topology == "base:2"


def test_a_simulation_reports_the_in_degrees_of_its_drawn_overlay(tmp_path):
    assert main(["simulate", "--peers", "6", "--topology", "el-local:2", "--rounds", "3", "--local-steps", "1",
                 "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    expected = parse_topology("el-local:2", 6).in_degrees(3)
    assert summary["in_degree"] == {
        "mean": 2.0, "std": round(float(np.std(expected)), 3), "min": min(expected), "max": max(expected),
    }


def test_gossiping_peers_on_a_base_graph_hold_the_exact_mean_after_one_period():
    topology = parse_topology("base:2", 11)
    values = torch.randn(11, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, _, learners, protocols, _ = build_gossip(topology, list(values))

    async def main():
        await asyncio.gather(*(p.run(topology.period) for p in protocols))

    run(main())
    got = torch.stack([learner.value for learner in learners])
    torch.testing.assert_close(got, values.mean(dim=0).expand_as(got), rtol=0, atol=1e-12)


# --- attackers on drawn overlays --------------------------------------------------------


def test_targeted_attackers_parse_and_are_refused_on_a_fixed_graph(capsys):
    spec = parse_byzantine("0.2:alie:1:targeted")
    assert (spec.attack, spec.parameter, spec.targeted) == ("alie", 1.0, True)
    assert not parse_byzantine("0.2:signflip").targeted
    with pytest.raises(ByzantineError, match="unknown attack"):
        parse_byzantine("0.2:targeted")
    assert main(["simulate", "--peers", "8", "--topology", "ring", "--byzantine", "0.25:signflip:targeted"]) == 2
    assert "same every round already" in capsys.readouterr().err


def test_targeted_attackers_send_to_the_same_victims_every_round_and_nobody_else_hears_them():
    topology = parse_topology("el-oracle:2", 8, seed=0)
    ids = peer_ids(8)
    attackers = frozenset({ids[1], ids[5]})
    victims = choose_victims(topology, ids, attackers, seed=0)
    assert len(victims) == 2 and not set(victims) & attackers
    rigged = targeted_topology(topology, {1, 5}, {ids.index(v) for v in victims})
    for round in range(6):
        for peer in set(range(8)) - {1, 5}:
            heard = rigged.in_weights(peer, round)
            honest = {j for j in topology.in_weights(peer, round) if j not in (1, 5)}
            assert set(heard) == honest | ({1, 5} if ids[peer] in victims else set())
            assert set(heard.values()) <= {1 / (1 + len(heard))}
            assert rigged.self_weight(peer, round) == pytest.approx(1 / (1 + len(heard)))
        assert rigged.out_neighbours(1, round) == sorted(ids.index(v) for v in victims)


def test_a_targeted_run_reports_its_victims_apart(tmp_path):
    result = simulate(SimulationConfig(
        peers=8, topology="el-oracle:2", rounds=2, local_steps=2, byzantine="0.25:signflip:targeted", out=tmp_path,
    ))
    summary = result.summary
    assert len(summary["victims"]) == 2 and not set(summary["victims"]) & set(summary["attackers"])
    assert summary["mean_accuracy_victims"] is not None and summary["mean_accuracy_spared"] is not None


@pytest.mark.parametrize(
    ("spec", "reason"),
    [("nonsense", "unknown topology"), ("el-local:0", "S must be at least 1"), ("erdos:2", r"P must be in \(0, 1\]"),
     ("smallworld:3:0.1", "K must be even"), ("file:/no/such/edges", "cannot read edge list")],
)
def test_a_real_peer_refuses_a_topology_that_names_no_graph_before_it_starts(spec, reason):
    # A real peer lays its view out on the graph only later, falling back to a ring for sizes the
    # graph does not exist at; a spec that names no graph at all must not get that far.
    with pytest.raises(ValueError, match=reason):
        SwarmConfig(topology=spec)
    assert SwarmConfig(topology="torus").topology == "torus"  # 7 live peers would make a ring, 9 a torus
