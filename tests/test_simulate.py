"""Whole simulated runs: outputs, determinism, learning, and the reference algorithm."""

import json

import pytest

from peer.config import SimulationConfig
from peer.simulate import simulate

SMALL = dict(peers=4, task="mnist1d", partition="iid", rounds=3, local_steps=2, seed=0)
SUMMARY_KEYS = {
    "algorithm", "task", "topology", "peers", "rounds", "seed", "mean_accuracy", "min_accuracy",
    "max_accuracy", "consensus_distance", "bytes_sent_total", "wall_seconds", "virtual_seconds",
}
RECORD_KEYS = {"round", "peer", "accuracy", "loss", "bytes_sent", "bytes_received", "virtual_time"}


def test_a_run_writes_metrics_and_summary(tmp_path):
    result = simulate(SimulationConfig(**SMALL, out=tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary == result.summary
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4 * 3
    assert all(RECORD_KEYS <= line.keys() for line in lines)
    assert {(line["peer"], line["round"]) for line in lines} == {(f"peer-{p}", r) for p in range(4) for r in range(3)}
    # On a ring every peer sends its model to two neighbours every round.
    assert all(line["bytes_sent"] > 0 and line["bytes_received"] == line["bytes_sent"] for line in lines)
    assert summary["bytes_sent_total"] == sum(line["bytes_sent"] for line in lines if line["round"] == 2)
    assert summary["virtual_seconds"] > 0


def test_the_same_seed_gives_the_same_run(tmp_path):
    first = simulate(SimulationConfig(**SMALL, out=tmp_path / "a")).summary
    second = simulate(SimulationConfig(**SMALL, out=tmp_path / "b")).summary
    first.pop("wall_seconds"), second.pop("wall_seconds")
    assert first == second
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()


def test_another_seed_gives_another_run():
    first = simulate(SimulationConfig(**SMALL)).summary
    second = simulate(SimulationConfig(**{**SMALL, "seed": 1})).summary
    assert first["mean_accuracy"] != second["mean_accuracy"] or first["consensus_distance"] != second["consensus_distance"]


def test_gossip_learns_and_peers_draw_together():
    config = SimulationConfig(**{**SMALL, "peers": 8, "rounds": 15, "local_steps": 10, "eval_every": 5})
    summary = simulate(config).summary
    assert summary["mean_accuracy"] > 0.45  # chance is 0.10
    early = simulate(SimulationConfig(**{**SMALL, "peers": 8, "rounds": 1, "local_steps": 10})).summary
    assert summary["mean_accuracy"] > early["mean_accuracy"]


def test_fedavg_reference_reports_the_global_model():
    summary = simulate(SimulationConfig(**{**SMALL, "algorithm": "fedavg"})).summary
    assert summary["consensus_distance"] is None  # one model, the server's
    assert summary["min_accuracy"] == summary["max_accuracy"] == summary["mean_accuracy"]
    assert "centralised reference" in summary["label"]
    assert summary["topology"] == "server" and summary["sample_size"] is None  # every client, each round


def test_lossy_network_costs_timeouts_but_finishes():
    summary = simulate(SimulationConfig(**{**SMALL, "link_loss": 0.5, "exchange_timeout": 5.0})).summary
    assert summary["missed_exchanges_total"] > 0
    assert summary["virtual_seconds"] >= 5.0


def test_fashion_mnist_runs_end_to_end_from_idx_files(tmp_path):
    from tests.helpers import write_fashion_files

    write_fashion_files(tmp_path / "fashion-mnist", train=400, test=200)
    config = SimulationConfig(
        peers=2, topology="ring", task="fashion-mnist", data_dir=tmp_path, partition="iid",
        rounds=2, local_steps=15, seed=0,
    )
    summary = simulate(config).summary
    assert summary["lr"] == 0.02  # the task's own learning rate
    assert summary["mean_accuracy"] > 0.5  # ten classes: chance is 0.1


def test_a_run_can_stop_once_it_reaches_its_target():
    config = SimulationConfig(**{**SMALL, "rounds": 30, "local_steps": 5, "target_accuracy": 0.3, "stop_at_target": True})
    summary = simulate(config).summary
    assert summary["stopped_at_target"] and summary["rounds_completed"] < 30
    assert summary["rounds_to_target"] == summary["rounds_completed"]
    assert summary["mean_accuracy"] >= 0.3


def test_stopping_at_a_target_needs_one():
    from peer.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="--stop-at-target needs --target-accuracy or --target-loss"):
        build_config(SimulationConfig, {}, {"stop_at_target": True})


def test_a_run_can_stop_once_its_mean_loss_falls_to_a_loss_target():
    # mnist1d starts near ln 10 = 2.3; these peers are below 2.0 after a few rounds.
    config = SimulationConfig(**{**SMALL, "rounds": 30, "local_steps": 5, "target_loss": 2.0, "stop_at_target": True})
    summary = simulate(config).summary
    assert summary["stopped_at_target"] and summary["rounds_completed"] < 30
    assert summary["rounds_to_target"] == summary["rounds_completed"]
    assert summary["target_loss"] == 2.0 and summary["target_accuracy"] is None
    assert summary["mean_loss"] <= 2.0


def test_a_run_that_evaluates_a_sample_of_peers_stops_once_the_samples_mean_reaches_the_target():
    config = SimulationConfig(
        **{**SMALL, "rounds": 30, "local_steps": 5, "target_loss": 2.0, "stop_at_target": True, "eval_peers": 2}
    )
    summary = simulate(config).summary
    assert summary["stopped_at_target"] and summary["rounds_completed"] < 30
    assert summary["rounds_to_target"] == summary["rounds_completed"] and summary["eval_peers"] == 2


def test_a_run_without_rounds_stops_once_the_peers_latest_losses_fall_to_the_target():
    config = SimulationConfig(
        peers=4, topology="ring", task="mnist1d", partition="iid", rounds=30, local_steps=5, seed=0,
        algorithm="async-gossip", target_loss=2.1, stop_at_target=True,
    )
    summary = simulate(config).summary
    assert summary["stopped_at_target"] and summary["rounds_completed"] < 30
    assert summary["rounds_to_target"] is not None and summary["virtual_seconds_to_target"] > 0


def test_a_run_without_a_target_reports_neither_target():
    summary = simulate(SimulationConfig(**{**SMALL, "rounds": 1})).summary
    assert summary["target_accuracy"] is None and summary["target_loss"] is None
    assert summary["rounds_to_target"] is None and summary["virtual_seconds_to_target"] is None


def test_a_run_is_refused_both_a_target_accuracy_and_a_target_loss():
    from peer.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="--target-accuracy and --target-loss: a run has one target; give one of them"):
        build_config(SimulationConfig, {}, {"target_accuracy": 0.5, "target_loss": 1.0})
