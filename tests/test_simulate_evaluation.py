"""Evaluation that does not dominate a run: --eval-peers K evaluates the same K peers at every
evaluated round and every peer at the end; --eval-samples M evaluates on M test samples."""

import asyncio
import json

import pytest

from peer.config import ConfigError, SimulationConfig, build_config
from peer.metrics import consensus_distance
from peer.runs import load_run
from peer.sim import VirtualTimeLoop
from peer.simulate import World, evaluation_sample, peer_ids, simulate

SIX = {"peers": 6, "task": "mnist1d", "partition": "iid", "rounds": 4, "local_steps": 5, "seed": 0}
ALL_SIX = peer_ids(6)


def evaluated(folder):
    """Each round's peers whose record carries a test accuracy."""
    rounds = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["accuracy"] is not None:
            rounds.setdefault(record["round"], []).append(record["peer"])
    return {round_: sorted(peers) for round_, peers in rounds.items()}


@pytest.mark.parametrize("algorithm", ["dpsgd", "async-gossip"])
def test_eval_peers_evaluates_the_same_peers_every_round_and_every_peer_at_the_end(tmp_path, algorithm):
    result = simulate(SimulationConfig(**SIX, eval_peers=2, algorithm=algorithm, out=tmp_path))
    rounds = evaluated(tmp_path)
    sample = rounds[0]
    assert len(sample) == 2 and rounds[1] == rounds[2] == sample
    assert rounds[3] == ALL_SIX
    summary = result.summary
    assert summary["eval_peers"] == 2 and summary["eval_samples"] is None
    # The final figures are every peer's last evaluation.
    accuracies = [record.accuracy for record in result.final]
    assert sorted(record.peer for record in result.final) == ALL_SIX and None not in accuracies
    assert summary["mean_accuracy"] == pytest.approx(sum(accuracies) / 6)
    assert (summary["min_accuracy"], summary["max_accuracy"]) == (min(accuracies), max(accuracies))


def test_a_rounds_point_of_the_curve_is_the_mean_over_the_peers_that_evaluated_it(tmp_path):
    simulate(SimulationConfig(**SIX, eval_peers=2, out=tmp_path))
    accuracy = {}
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["accuracy"] is not None:
            accuracy.setdefault(record["round"], []).append(record["accuracy"])
    points = load_run(tmp_path).points
    assert [point.peers for point in points] == [2, 2, 2, 6]
    for point in points:
        assert point.mean_accuracy == pytest.approx(sum(accuracy[point.round]) / len(accuracy[point.round]))


def test_a_curve_without_rounds_read_back_starts_once_the_sample_has_evaluated(tmp_path):
    simulate(SimulationConfig(**SIX, eval_peers=2, algorithm="async-gossip", out=tmp_path))
    points = load_run(tmp_path).points
    assert points[0].peers == 2 and points[0].round == 0
    assert points[-1].peers == 6


def test_the_consensus_of_each_round_is_the_samples_the_final_one_every_peers():
    world = World(SimulationConfig(**SIX, eval_peers=2))
    try:
        with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
            seconds = runner.run(world.run())
        summary, _ = world.summary(seconds, 0.0)
        states = {peer: trainer.state() for peer, trainer in world.trainers.items()}
    finally:
        world.close()
    by_round = dict(summary["consensus_by_round"])
    assert sorted(by_round) == [0, 1, 2, 3]
    assert by_round[3] == pytest.approx(consensus_distance([states[peer] for peer in sorted(world.sampled)]), rel=1e-4)
    assert summary["consensus_distance"] == pytest.approx(consensus_distance(list(states.values())), rel=1e-4)


def test_the_sample_is_drawn_once_from_the_seed():
    sample = evaluation_sample(ALL_SIX, 2, seed=0)
    assert len(sample) == 2 and sample <= set(ALL_SIX)
    assert evaluation_sample(ALL_SIX, 2, seed=0) == sample
    assert len({evaluation_sample(ALL_SIX, 2, seed=seed) for seed in range(10)}) > 1


def test_as_many_eval_peers_as_peers_or_more_evaluates_every_peer_every_round(tmp_path):
    assert evaluation_sample(ALL_SIX, None, seed=0) is None
    assert evaluation_sample(ALL_SIX, 6, seed=0) is None and evaluation_sample(ALL_SIX, 7, seed=0) is None
    summary = simulate(SimulationConfig(**SIX, eval_peers=10, out=tmp_path)).summary
    assert evaluated(tmp_path) == {round_: ALL_SIX for round_ in range(4)}
    assert summary["eval_peers"] == 6


def test_without_the_eval_settings_the_summary_says_every_peer_on_every_test_sample():
    summary = simulate(SimulationConfig(**{**SIX, "rounds": 1})).summary
    assert summary["eval_peers"] is None and summary["eval_samples"] is None


def test_newcomers_evaluate_their_last_round_only(tmp_path):
    simulate(SimulationConfig(**{**SIX, "peers": 4}, eval_peers=2, faults="join:2@1", out=tmp_path))
    rounds = evaluated(tmp_path)
    assert all({"peer-4", "peer-5"}.isdisjoint(rounds[round_]) for round_ in range(3))
    assert {"peer-4", "peer-5"} <= set(rounds[3])


def test_attackers_are_never_in_the_sample():
    world = World(SimulationConfig(**SIX, byzantine="0.34:signflip", eval_peers=3))
    try:
        assert len(world.attackers) == 2 and len(world.sampled) == 3
        assert world.sampled.isdisjoint(world.attackers)
    finally:
        world.close()


def test_eval_samples_evaluates_every_peer_on_the_same_test_samples():
    world = World(SimulationConfig(**SIX, eval_samples=100))
    try:
        tests = [trainer.test_y for trainer in world.trainers.values()]
        assert all(len(test) == 100 and bool((test == tests[0]).all()) for test in tests)
        assert len(world.task.test_y) > 100
    finally:
        world.close()
    summary = simulate(SimulationConfig(**{**SIX, "rounds": 1}, eval_samples=100)).summary
    assert summary["eval_samples"] == 100


def test_eval_samples_beyond_the_test_set_evaluates_on_all_of_it():
    summary = simulate(SimulationConfig(**{**SIX, "rounds": 1}, eval_samples=10**9)).summary
    world = World(SimulationConfig(**SIX))
    try:
        assert summary["eval_samples"] == len(world.task.test_y)
    finally:
        world.close()


@pytest.mark.parametrize("algorithm", ["fedavg", "modest", "srrw"])
def test_eval_peers_is_refused_where_a_round_ends_in_one_model(algorithm):
    with pytest.raises(ConfigError, match=f"--eval-peers: {algorithm} ends each round in one model, which is evaluated once"):
        build_config(SimulationConfig, {}, {"peers": 6, "algorithm": algorithm, "eval_peers": 2})
