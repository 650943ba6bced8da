"""Asynchronous gossip in the simulator: nobody waits, slow peers keep up, runs end on time."""

from __future__ import annotations

import itertools
import json

import pytest

from peer.config import ConfigError, SimulationConfig, build_config
from peer.simulate import simulate

SMALL = {
    "peers": 6, "topology": "ring", "task": "mnist1d", "partition": "iid", "rounds": 12, "local_steps": 2, "seed": 0,
    "algorithm": "async-gossip", "step_time": 0.01,
}


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def by_peer(lines):
    peers: dict[str, list[dict]] = {}
    for line in lines:
        peers.setdefault(line["peer"], []).append(line)
    return peers


def test_no_peer_waits_for_one_100_times_slower_nor_for_one_that_crashed(tmp_path):
    speeds = tmp_path / "speeds.txt"
    speeds.write_text("0.01\n1.0\n" + "0.01\n" * 4)  # peer-1 is 100x slower
    out = tmp_path / "run"
    # peer-0 (drawn from the seed) crashes when the first peer starts iteration 6.
    summary = simulate(SimulationConfig(**{**SMALL, "speeds": f"file:{speeds}", "faults": "crash:0.2@6"}, out=out)).summary
    assert summary["peers_up_at_end"] == 5 and not summary["stalled"]
    assert summary["slow_peers"] == ["peer-1"]
    lines = by_peer(records(out))
    # It crashed as the first record of iteration 5 was written, its own or another's.
    assert [line["round"] for line in lines["peer-0"]] in (list(range(5)), list(range(6)))
    for peer, peer_lines in lines.items():
        assert all(line["exchange_seconds"] == 0 for line in peer_lines)
        if peer != "peer-1":
            # Iteration i of a fast peer ends at exactly (i + 1) times its local work: it never waited,
            # not for the slow peer, nor for the crashed one.
            assert [line["virtual_time"] for line in peer_lines] == pytest.approx([(i + 1) * 0.02 for i in range(len(peer_lines))])
    for peer in ("peer-2", "peer-3", "peer-4", "peer-5"):
        assert lines[peer][-1]["round"] == 11
    # The slow peer did one iteration of its own while the others did the whole run, and its
    # neighbours were at the end by then: it went on to the last iteration, from their final models,
    # and ended there with its model evaluated.
    assert [line["round"] for line in lines["peer-1"]] == [0, 11] and lines["peer-1"][-1]["accuracy"] is not None
    assert [line["virtual_time"] for line in lines["peer-1"]] == pytest.approx([2.0, 4.0])


def test_a_peer_whose_neighbours_reached_the_last_iteration_still_takes_it(tmp_path):
    # peer-1 is 4.7 times slower; in a complete graph it goes on from the fast peers' iteration after
    # each of its own. When its third ends theirs have all ended: it goes on to the last iteration, not
    # past it (which would end its run with the iteration it jumped from as its last record).
    speeds = tmp_path / "speeds.txt"
    speeds.write_text("0.01\n0.047\n0.01\n")
    out = tmp_path / "run"
    simulate(SimulationConfig(**{**SMALL, "peers": 3, "topology": "complete", "speeds": f"file:{speeds}"}, out=out))
    lines = by_peer(records(out))
    assert [line["round"] for line in lines["peer-1"]] == [0, 4, 8, 11]
    assert lines["peer-1"][-1]["virtual_time"] == pytest.approx(4 * 2 * 0.047)  # four iterations of its own
    for peer_lines in lines.values():
        assert peer_lines[-1]["round"] == 11 and peer_lines[-1]["accuracy"] is not None


def test_a_slow_peer_moves_on_to_its_neighbours_iteration_and_ends_with_them(tmp_path):
    out = tmp_path / "run"
    summary = simulate(SimulationConfig(**{**SMALL, "speeds": "stragglers:0.2:4", "eval_every": 3}, out=out)).summary
    slow = summary["slow_peers"]
    assert len(slow) == 1
    lines = by_peer(records(out))
    rounds = [line["round"] for line in lines[slow[0]]]
    assert rounds[0] == 0 and rounds[-1] == 11 and len(rounds) <= 5  # about one in four iterations of its own
    assert all(later - earlier >= 2 for earlier, later in itertools.pairwise(rounds))
    # It is evaluated on the first iteration at or after each third one, however it got there.
    evaluated = [line["round"] for line in lines[slow[0]] if line["accuracy"] is not None]
    previous = [-1, *rounds[:-1]]
    due = [r for r, before in zip(rounds, previous) if (r + 1) // 3 > (before + 1) // 3 or r == rounds[-1]]
    assert evaluated == due and len(due) >= 3
    assert summary["mean_accuracy_slow"] is not None and summary["mean_accuracy_fast"] is not None
    fast_ends = [lines[peer][-1]["virtual_time"] for peer in lines if peer not in slow]
    assert max(fast_ends) == pytest.approx(12 * 0.02)
    assert lines[slow[0]][-1]["virtual_time"] <= 12 * 0.02 + 4 * 0.02 + 1e-9  # at most one slow iteration later


def test_adaptive_local_steps_give_a_slower_peer_fewer_steps_and_keep_it_in_step(tmp_path):
    out = tmp_path / "run"
    summary = simulate(SimulationConfig(
        **{**SMALL, "speeds": "stragglers:0.2:4", "local_steps": "adaptive:8"}, out=out
    )).summary
    assert summary["local_steps"] == "adaptive:8"
    lines = by_peer(records(out))
    slow = summary["slow_peers"][0]
    assert [line["local_steps"] for line in lines[slow]][2:] == [2] * (len(lines[slow]) - 2)
    assert all(line["local_steps"] == 8 for peer in lines if peer != slow for line in lines[peer])
    assert len(lines[slow]) >= 9  # it keeps pace: about as many iterations as the others
    assert summary["local_steps_total"] == sum(line["local_steps"] for line in records(out))


def test_a_run_ends_at_its_duration_with_every_peer_evaluated(tmp_path):
    out = tmp_path / "run"
    summary = simulate(SimulationConfig(
        **{**SMALL, "rounds": 1000, "duration": 0.1, "speeds": "stragglers:0.2:4", "eval_every": 100}, out=out
    )).summary
    lines = by_peer(records(out))
    assert len(lines) == 6 and summary["rounds_completed"] < 1000
    for peer_lines in lines.values():
        assert peer_lines[-1]["accuracy"] is not None
        assert peer_lines[-1]["virtual_time"] >= 0.1
        assert all(line["virtual_time"] < 0.1 for line in peer_lines[:-1])
    assert summary["virtual_seconds"] <= 0.1 + 4 * 0.02 + 0.05


def test_with_equal_speeds_every_peer_does_every_iteration_and_the_run_replays(tmp_path):
    settings = {**SMALL, "local_steps": 5}
    first = simulate(SimulationConfig(**settings, out=tmp_path / "a")).summary
    second = simulate(SimulationConfig(**settings, out=tmp_path / "b")).summary
    first.pop("wall_seconds"), second.pop("wall_seconds")
    assert first == second
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()
    assert first["slow_peers"] == [] and first["mean_accuracy_slow"] is None
    assert {(line["peer"], line["round"]) for line in records(tmp_path / "a")} == {
        (f"peer-{p}", r) for p in range(6) for r in range(12)
    }
    assert first["mean_accuracy"] > 0.2  # chance is 0.1
    assert first["staleness"] == "poly:0.5" and first["max_staleness"] == 32


def test_jittered_speeds_replay_for_a_seed_and_newcomers_join(tmp_path):
    settings = {**SMALL, "speeds": "lognormal:0.3+jitter:0.2", "faults": "join:2@4,leave:0.2@8"}
    first = simulate(SimulationConfig(**settings, out=tmp_path / "a")).summary
    again = simulate(SimulationConfig(**settings, out=tmp_path / "b")).summary
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()
    assert first["mean_accuracy"] == again["mean_accuracy"]
    peers = by_peer(records(tmp_path / "a"))
    assert {"peer-6", "peer-7"} <= peers.keys()  # the newcomers trained and were evaluated
    assert first["peers_up_at_end"] == 6  # 6 + 2 newcomers, less the 20% that left


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"algorithm": "async-gossip", "codec": "topk:0.1", "error_feedback": "choco"}, "--error-feedback none"),
        ({"algorithm": "async-gossip", "gossip_steps": 2}, "--gossip-steps is for rounds"),
        ({"algorithm": "dpsgd", "staleness": "poly:1"}, "only for --algorithm async-gossip"),
        ({"algorithm": "dpsgd", "max_staleness": 4}, "only for --algorithm async-gossip"),
        ({"algorithm": "dpsgd", "local_steps": "adaptive:10"}, "only for --algorithm async-gossip"),
        ({"algorithm": "srrw", "duration": 10}, "give --rounds instead"),
        ({"algorithm": "modest", "duration": 10}, "give --rounds instead"),
        ({"algorithm": "async-gossip", "byzantine": "0.2:signflip"}, "not async-gossip"),
        ({"algorithm": "async-gossip", "local_steps": "adaptive:0"}, "adaptive:H"),
        ({"algorithm": "async-gossip", "staleness": "poly:-0.5"}, "must be a number >= 0"),
        ({"algorithm": "async-gossip", "max_staleness": -1}, "--max-staleness"),
        ({"speeds": "stragglers:0.25:-4"}, "slowdown must be > 0"),
        ({"speeds": "warp:9"}, "unknown --speeds"),
        ({"algorithm": "async-gossip", "mix_point": "start"}, "--mix-point"),
        ({"algorithm": "modest", "mix_point": "trained"}, "--mix-point"),
    ],
)
def test_settings_that_do_not_go_together_are_refused_with_the_reason(settings, words):
    with pytest.raises(ConfigError, match=words):
        build_config(SimulationConfig, {}, settings)


def test_a_lossy_codec_without_error_feedback_and_a_robust_rule_work_without_rounds():
    config = build_config(SimulationConfig, {}, {**SMALL, "codec": "int8", "mixing": "clipped", "rounds": 4})
    assert config.gossip.error_feedback == "none"
    summary = simulate(config).summary
    assert summary["codec"] == "int8" and summary["mean_accuracy"] > 0.1


def test_sharpness_aware_local_steps_combine_with_asynchronous_gossip():
    plain = SimulationConfig(**SMALL)
    sam = SimulationConfig(**SMALL, sam_rho=0.1)
    assert plain.sharpness_radius() == 0.0 and sam.sharpness_radius() == 0.1
    summary = simulate(SimulationConfig(**{**SMALL, "rounds": 3}, sam_rho=0.1)).summary
    assert summary["sam_rho"] == 0.1 and summary["mean_accuracy"] is not None
    assert simulate(SimulationConfig(**{**SMALL, "rounds": 3})).summary["sam_rho"] is None
