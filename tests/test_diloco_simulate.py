"""DiLoCo in the simulator with real models: faults, replay, compression and what the summary says."""

import json

import pytest

from peer.config import SimulationConfig
from peer.simulate import simulate
from peer.tasks import load_task

SMALL = dict(peers=8, task="mnist1d", partition="iid", rounds=6, local_steps=2, seed=0, eval_every=3, algorithm="diloco")


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mix", ["all", "gossip:1"])
def test_diloco_goes_on_when_peers_crash_and_newcomers_join(tmp_path, mix):
    config = SimulationConfig(**SMALL, outer_mix=mix, faults="crash:0.25@2,join:2@3", exchange_timeout=2.0, out=tmp_path)
    summary = simulate(config).summary
    assert summary["rounds_completed"] == 6 and not summary["stalled"] and summary["peers_up_at_end"] == 8
    newcomers = {"peer-8", "peer-9"}
    written = records(tmp_path)
    assert min(r["round"] for r in written if r["peer"] in newcomers) >= 3  # they started at the swarm's round
    assert {r["peer"] for r in written if r["round"] == 5} >= newcomers


def test_the_all_reduce_keeps_one_start_point_and_counts_a_ring_all_reduces_bytes(tmp_path):
    summary = simulate(SimulationConfig(**SMALL, out=tmp_path)).summary
    assert summary["consensus_distance"] < 1e-6
    model = load_task("mnist1d", None, peers=8).make_model()
    size = 4 * sum(tensor.numel() for tensor in model.state_dict().values() if tensor.is_floating_point())
    # Each of 8 peers sends 2 * 7 / 8 of its pseudo-gradient a round, for 6 rounds.
    assert summary["bytes_sent_total"] == 8 * 6 * (2 * 7 * size // 8)


def test_a_diloco_run_replays_exactly_for_a_seed(tmp_path):
    config = dict(SMALL, outer_mix="gossip:1", faults="crash:0.25@2,join:1@4", exchange_timeout=2.0)
    first = simulate(SimulationConfig(**config, out=tmp_path / "a")).summary
    second = simulate(SimulationConfig(**config, out=tmp_path / "b")).summary
    first.pop("wall_seconds"), second.pop("wall_seconds")
    assert first == second
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()


def test_the_summary_reports_the_outer_settings_each_mix_resolves_to():
    everyone = simulate(SimulationConfig(**SMALL)).summary
    pairs = simulate(SimulationConfig(**SMALL, outer_mix="gossip:1")).summary
    assert (everyone["outer_optimizer"], everyone["outer_momentum"], everyone["outer_lr"]) == ("nesterov", 0.9, 0.7)
    assert (pairs["outer_optimizer"], pairs["outer_momentum"]) == ("sgd", 0.3)


def test_a_robust_rule_ranks_the_start_points_and_pseudo_gradients_of_a_group():
    summary = simulate(SimulationConfig(**SMALL, outer_mix="gossip:3", mixing="trimmed-mean:1")).summary
    assert summary["rounds_completed"] == 6 and summary["mixing"] == "trimmed-mean:1"
    assert 0.0 <= summary["mean_accuracy"] <= 1.0 and summary["rejected_total"] == 0
