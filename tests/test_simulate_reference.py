"""The single-peer reference, `peer simulate --peers 1`: one peer training alone on all the data,
whatever the algorithm, through the same records and summary as a swarm."""

import json

import pytest

from peer.cli import main
from peer.config import ConfigError, SimulationConfig, build_config
from peer.simulate import World, simulate

FLAGS = {"task": "mnist1d", "partition": "iid", "rounds": 5, "local_steps": 20, "seed": 0}
ALONE = "--peers 1 trains one peer alone on all the data (the reference)"


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_one_peer_holds_the_whole_training_set():
    world = World(SimulationConfig(**{**FLAGS, "partition": "dirichlet:0.1"}, peers=1))
    try:
        assert list(world.trainers) == ["peer-0"]
        assert len(world.trainers["peer-0"].train_y) == len(world.task.train_y)
    finally:
        world.close()


def test_the_reference_takes_one_swarm_peers_local_steps_learns_and_sends_nothing(tmp_path):
    reference = simulate(SimulationConfig(**FLAGS, peers=1, target_accuracy=0.2, out=tmp_path)).summary
    swarm = simulate(SimulationConfig(**FLAGS, peers=4)).summary
    assert reference["peers"] == 1 and reference["rounds_completed"] == 5
    assert reference["reference"] is True and swarm["reference"] is False
    assert reference["local_steps_total"] == swarm["local_steps_total"] / 4 == 5 * 20
    assert reference["mean_accuracy"] > 0.3  # ten classes: chance is 0.1
    assert reference["bytes_sent_total"] == 0 and reference["missed_exchanges_total"] == 0
    assert reference["rounds_to_target"] is not None and reference["bytes_to_target"] == 0
    assert reference["virtual_seconds_to_target"] > 0
    assert reference["label"] == "one peer on all the training data (reference)" and reference["topology"] == "none"
    lines = records(tmp_path)
    assert [(line["peer"], line["round"], line["local_steps"]) for line in lines] == [("peer-0", r, 20) for r in range(5)]
    assert all(line["accuracy"] is not None and line["bytes_sent"] == 0 for line in lines)
    assert reference["mean_accuracy"] == reference["min_accuracy"] == reference["max_accuracy"] == lines[-1]["accuracy"]


@pytest.mark.parametrize("algorithm", ["fedavg", "modest", "async-gossip"])
def test_the_algorithm_does_not_change_the_reference(algorithm):
    dpsgd = simulate(SimulationConfig(**FLAGS, peers=1, algorithm="dpsgd")).summary
    other = simulate(SimulationConfig(**FLAGS, peers=1, algorithm=algorithm)).summary
    assert other["algorithm"] == algorithm and other["reference"] is True and other["bytes_sent_total"] == 0
    for key in ("mean_accuracy", "mean_loss", "local_steps_total", "virtual_seconds", "rounds_completed"):
        assert other[key] == dpsgd[key], key


def test_an_algorithms_own_figures_are_null_in_a_reference_as_it_did_not_run():
    summary = simulate(SimulationConfig(**{**FLAGS, "rounds": 2}, peers=1, algorithm="srrw")).summary
    assert summary["reference"] is True and summary["peers"] == 1 and summary["rounds_completed"] == 2
    assert summary["tokens_reissued"] is None and summary["token_copies"] is None


def test_the_reference_follows_the_evaluation_settings(tmp_path):
    summary = simulate(
        SimulationConfig(**FLAGS, peers=1, eval_every=2, eval_samples=100, eval_peers=1, out=tmp_path)
    ).summary
    assert [line["accuracy"] is not None for line in records(tmp_path)] == [False, True, False, True, True]
    assert summary["eval_samples"] == 100 and summary["eval_peers"] == 1


def test_the_reference_prints_its_table(capsys):
    assert main(["simulate", "--peers", "1", "--rounds", "2", "--local-steps", "2", "--algorithm", "srrw"]) == 0
    out = capsys.readouterr().out
    assert "one peer on all the training data (reference)" in out and "0.00 MB" in out


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"faults": "crash:0.5@2"}, f"--faults: {ALONE}, with no other peer to crash, leave, join or cut off; leave it out"),
        ({"faults": "join:2@2"}, f"--faults: {ALONE}"),
        ({"byzantine": "0.2:signflip"}, f"--byzantine: {ALONE}, with nobody to attack it; leave it out"),
        ({"eval_peers": 2}, f"--eval-peers 2: {ALONE}, and evaluates that one; leave it out"),
        ({"algorithm": "srrw", "tokens": 2}, "--tokens 2 is more than the 1 peers they would walk between"),
    ],
)
def test_settings_that_need_several_peers_are_refused_for_one(flags, message):
    with pytest.raises(ConfigError) as refused:
        build_config(SimulationConfig, {}, {"peers": 1, **flags})
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)
