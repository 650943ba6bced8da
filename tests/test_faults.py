"""Faults replayed by the simulator: the spec, and every protocol under crashes, goodbyes and newcomers."""

import asyncio
import json

import pytest

from gossip.message import Message
from peer.cli import main
from peer.config import SimulationConfig
from peer.sim import LinkModel, SimNetwork
from peer.sim.faults import Fault, FaultError, parse_faults
from peer.simulate import simulate
from tests.sim_swarm import run

SMALL = dict(peers=8, task="mnist1d", partition="iid", rounds=6, local_steps=2, seed=0, eval_every=3)


def test_a_spec_lists_its_events_in_round_order():
    assert parse_faults("join:4@5, crash:0.5@2,leave:0.25@3", rounds=10) == (
        Fault("crash", 0.5, 2), Fault("leave", 0.25, 3), Fault("join", 4, 5),
    )
    assert parse_faults("none", rounds=10) == () == parse_faults("", rounds=10)


def test_a_partition_is_a_cut_and_a_heal_and_the_next_one_may_start_where_it_heals():
    assert parse_faults("partition:0.25@6-8,crash:0.5@7,partition:0.5@2-6", rounds=10) == (
        Fault("partition", 0.5, 2), Fault("heal", 0.5, 6), Fault("partition", 0.25, 6), Fault("crash", 0.5, 7),
        Fault("heal", 0.25, 8),
    )


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
        ("partition:0.5@3", "START-END"),
        ("crash:0.5@3-5", "START-END"),
        ("partition:0.5@5-5", "END > START"),
        ("partition:0.5@6-4", "END > START"),
        ("partition:1@3-5", "fraction of the peers in (0, 1)"),
        ("partition:0@3-5", "fraction of the peers in (0, 1)"),
        ("partition:0.5@3-10", "ends at round 10, past the last round 9"),
        ("partition:0.5@2-5,partition:0.3@4-8", "overlap"),
        ("partition:0.5@4-8,partition:0.3@1-9", "overlap"),
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
        (["--faults", "partition:0.5@50-20"], "END > START"),
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


def test_a_partition_loses_the_messages_between_its_sides_until_it_heals():
    network = SimNetwork(LinkModel(latency=0.1))
    peers = {name: network.attach(name) for name in ("a", "b", "c")}
    arrived = []

    async def note(message):
        arrived.append((message.sender, message.round))

    for transport in peers.values():
        transport.serve("note", note)

    async def send_all(round_):
        for src, dst in (("a", "b"), ("b", "a"), ("a", "c"), ("c", "a"), ("b", "c")):
            await peers[src].send(dst, Message("note", src, round_))
        await asyncio.sleep(1)

    async def main():
        network.cut({"a"})
        await send_all(0)
        await peers["a"].send("b", Message("note", "a", 1))
        network.heal()  # a message in flight when the network heals is lost too, as it was cut off on the way
        await send_all(2)

    run(main())
    assert sorted(arrived) == [("a", 2), ("a", 2), ("b", 0), ("b", 2), ("b", 2), ("c", 2)]


def test_two_halves_cut_apart_mix_again_once_the_partition_heals(tmp_path):
    config = SimulationConfig(**SMALL, faults="partition:0.5@2-4", exchange_timeout=2.0, out=tmp_path)
    summary = simulate(config).summary
    assert summary["rounds_completed"] == 6 and summary["peers_up_at_end"] == 8
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]

    def heard(round_):
        return sum(r["neighbours_heard"] for r in records if r["round"] == round_)

    full = sum(r["neighbours_expected"] for r in records if r["round"] == 0)
    # Round 1's last models may still be on their way when the cut comes (a downlink takes two
    # messages one after the other), so only round 0 is sure to be whole before it.
    assert heard(0) == full
    assert heard(2) < full and heard(3) < full  # the models across the cut were lost
    assert heard(5) == full
    assert summary["missed_exchanges_total"] > 0 and summary["rejected_total"] == 0


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
