"""Faults replayed by the simulator: the spec, and every protocol under crashes, goodbyes and newcomers."""

import json

import pytest

from peer.cli import main
from peer.config import SimulationConfig
from peer.sim.faults import Fault, FaultError, parse_faults
from peer.simulate import simulate

SMALL = dict(peers=8, topology="ring", task="mnist1d", partition="iid", rounds=6, local_steps=2, seed=0, eval_every=3)


def test_a_spec_lists_its_events_in_round_order():
    assert parse_faults("join:4@5, crash:0.5@2,leave:0.25@3", rounds=10) == (
        Fault("crash", 0.5, 2), Fault("leave", 0.25, 3), Fault("join", 4, 5),
    )
    assert parse_faults("none", rounds=10) == () == parse_faults("", rounds=10)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("crash:0.5", "does not parse"),
        ("explode:0.5@3", "does not parse"),
        ("crash:1.5@3", "fraction of the peers in (0, 1]"),
        ("crash:0@3", "fraction"),
        ("leave:0.2@10", "past the last round 9"),
        ("join:2.5@3", "whole number"),
        ("join:0@3", "whole number"),
        ("crash:1..2@3", "not a number"),
    ],
)
def test_a_bad_spec_says_what_is_wrong(spec, reason):
    with pytest.raises(FaultError) as error:
        parse_faults(spec, rounds=10)
    assert reason in str(error.value)


def test_victims_are_drawn_from_the_seed():
    up = [f"p{i}" for i in range(20)]
    fault = Fault("crash", 0.8, 3)
    assert fault.victims(up, 0, 0) == fault.victims(list(reversed(up)), 0, 0)
    assert len(fault.victims(up, 0, 0)) == 16
    assert fault.victims(up, 0, 0) != fault.victims(up, 1, 0)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--faults", "crash:2@1"], "fraction"),
        (["--faults", "crash:0.5@99", "--rounds", "10"], "past the last round"),
        (["--algorithm", "modest", "--sample-size", "20", "--peers", "8"], "larger than the swarm"),
        (["--algorithm", "fedavg", "--sample-size", "0"], "--sample-size"),
        (["--algorithm", "modest", "--success-fraction", "1.5"], "--success-fraction"),
        (["--algorithm", "modest", "--sample-size", "2", "--aggregators", "3"], "aggregators"),
        (["--algorithm", "modest", "--codec", "int8", "--error-feedback", "choco"], "error feedback"),
    ],
)
def test_bad_settings_are_one_line_and_exit_code_2(capsys, args, reason):
    code = main(["simulate", *args])
    err = capsys.readouterr().err
    assert code == 2 and reason in err and len(err.strip().splitlines()) == 1, err


def test_dpsgd_goes_on_when_peers_crash_and_newcomers_catch_up(tmp_path):
    config = SimulationConfig(**SMALL, faults="crash:0.25@2,join:2@3", exchange_timeout=2.0, out=tmp_path)
    summary = simulate(config).summary
    assert summary["peers_up_at_end"] == 8
    assert summary["rounds_completed"] == 6 and not summary["stalled"]
    assert summary["missed_exchanges_total"] > 0  # the crashed peers' neighbours waited for them
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    newcomers = {"peer-8", "peer-9"}
    first_round = min(r["round"] for r in records if r["peer"] in newcomers)
    assert first_round >= 2  # they started at their neighbours' round, not from scratch
    assert {r["peer"] for r in records if r["round"] == 5} >= newcomers


def test_neighbours_stop_waiting_for_a_peer_that_said_goodbye():
    crashed = simulate(SimulationConfig(**SMALL, faults="crash:0.25@2", exchange_timeout=2.0)).summary
    left = simulate(SimulationConfig(**SMALL, faults="leave:0.25@2", exchange_timeout=2.0)).summary
    assert left["missed_exchanges_total"] < crashed["missed_exchanges_total"]
    assert left["virtual_seconds"] < crashed["virtual_seconds"]


def test_fedavg_samples_its_clients_and_reports_the_global_model(tmp_path):
    summary = simulate(SimulationConfig(**SMALL, algorithm="fedavg", sample_size=3, out=tmp_path)).summary
    assert summary["sample_size"] == 3 and summary["topology"] == "server"
    records = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 6  # one global model a round
    assert summary["mean_accuracy"] == summary["min_accuracy"] == summary["max_accuracy"]


def test_fedavg_goes_on_when_clients_crash_leave_and_join():
    summary = simulate(
        SimulationConfig(**SMALL, algorithm="fedavg", sample_size=4, faults="crash:0.25@1,leave:0.25@2,join:2@3")
    ).summary
    assert summary["rounds_completed"] == 6 and summary["peers_up_at_end"] == 6


def test_modest_survives_most_peers_crashing():
    config = dict(SMALL, peers=20, rounds=12, algorithm="modest", sample_size=4, aggregators=2, ping_timeout=1.0)
    summary = simulate(SimulationConfig(**config, faults="crash:0.8@4,join:3@8")).summary
    assert summary["rounds_completed"] == 12 and not summary["stalled"]
    assert summary["peers_up_at_end"] == 7


def test_a_modest_run_replays_exactly_for_a_seed(tmp_path):
    config = dict(SMALL, algorithm="modest", sample_size=3, faults="crash:0.5@2,leave:0.2@3,join:2@4")
    first = simulate(SimulationConfig(**config, out=tmp_path / "a")).summary
    second = simulate(SimulationConfig(**config, out=tmp_path / "b")).summary
    first.pop("wall_seconds"), second.pop("wall_seconds")
    assert first == second
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()
    assert first["target_accuracy"] is None and first["rounds_completed"] == 6
