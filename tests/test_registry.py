"""A protocol is one file and one registry line: the program runs a new one in both worlds
without a line of ``peer/`` changed for it, and asks every protocol, never its name."""

import json
import subprocess
from pathlib import Path

import pytest

from gossip.protocols import Protocol, RoundReport, names, protocol_named, register
from peer.cli import main
from peer.config import SimulationConfig, SwarmConfig
from peer.net.swarm import run_swarm
from peer.simulate import simulate

REPOSITORY = Path(__file__).resolve().parent.parent


class LocalOnly(Protocol):
    """Each peer trains on its own data and mixes with nobody: the floor every method must beat."""

    name = "local-only"
    label = "Local training (no mixing)"
    overlay = "none"
    mixes_neighbours = False
    catches_up = False

    def __init__(self, context, *, local_steps):
        super().__init__(context)
        self.local_steps = local_steps

    @classmethod
    def build(cls, context, settings, *, peers, joining):
        return cls(context, local_steps=settings.local_steps)

    async def run(self, rounds, first_round=0):
        clock, learner = self.context.clock, self.context.learner
        for round_ in range(first_round, rounds):
            loss = await clock.compute(learner.train, self.local_steps, steps=self.local_steps)
            await self.context.round_finished(RoundReport(round_, loss, local_steps=self.local_steps))


SMALL = {"peers": 4, "rounds": 3, "local_steps": 2, "partition": "iid"}
# The figures that every summary names alike: a simulation's, a local swarm's and one peer's.
FIGURES = {
    "algorithm", "label", "task", "topology", "partition", "peers", "rounds", "rounds_completed", "local_steps",
    "codec", "error_feedback", "mean_accuracy", "min_accuracy", "max_accuracy", "mean_loss", "bytes_sent_total",
    "bytes_received_total", "rejected_total", "missed_exchanges_total", "local_steps_total", "wall_seconds",
    "rounds_to_target", "bytes_to_target",
}


def test_a_protocol_registered_by_a_test_runs_in_a_simulation_and_trains_alone(capsys):
    register(LocalOnly)
    assert "local-only" in names() and protocol_named("local-only") is LocalOnly
    summary = simulate(SimulationConfig(algorithm="local-only", **SMALL)).summary
    assert summary["label"] == "Local training (no mixing)" and summary["topology"] == "none"
    assert summary["rounds_completed"] == 3 and summary["bytes_sent_total"] == 0
    assert summary["local_steps_total"] == 4 * 3 * 2 and FIGURES <= summary.keys()
    assert main(["simulate", "--algorithm", "local-only", "--peers", "4", "--rounds", "2", "--local-steps", "1"]) == 0
    assert "Local training (no mixing)" in capsys.readouterr().out


@pytest.mark.network
def test_a_protocol_named_module_colon_class_runs_between_two_real_peer_processes(tmp_path, monkeypatch):
    monkeypatch.chdir(REPOSITORY)  # the peers import it from the working directory
    config = SwarmConfig(algorithm="tests.test_registry:LocalOnly", peers=2, rounds=3, local_steps=2, partition="iid", out=tmp_path)
    summary = run_swarm(config)
    assert summary["failed_peers"] == {}, [(tmp_path / f"peer-{i}" / "log.txt").read_text()[-3000:] for i in range(2)]
    assert summary["peers_finished"] == 2 and summary["rejected_total"] == 0 and FIGURES <= summary.keys()
    for index in range(2):
        peer = json.loads((tmp_path / f"peer-{index}" / "summary.json").read_text())
        assert peer["algorithm"] == "tests.test_registry:LocalOnly" and peer["rounds_completed"] == 3
        assert FIGURES <= peer.keys() and peer["peers"] == 1
        assert peer["mean_accuracy"] is not None and peer["peers_seen"]


def test_a_protocol_that_cannot_be_imported_is_one_line_and_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--algorithm", "tests.no_such_module:Nothing"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "cannot import it" in err and len(err.strip().splitlines()) == 1


def test_no_module_of_the_program_names_a_protocol():
    found = subprocess.run(
        ["grep", "-rnE", r"isinstance\(protocol|algorithm *(==|!=|in )", "peer/"], cwd=REPOSITORY,
        capture_output=True, text=True,
    )
    assert found.stdout == ""
