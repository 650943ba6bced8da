"""The self-repellent token walk between real peer processes on loopback: tokens walk to their
last hop and every peer finishes, and a token whose holder is killed is re-issued by the peer
that handed it over. Bounded in time; every process is cleaned up."""

import json
import re
import time

import pytest

from peer.config import SwarmConfig
from peer.net.swarm import LocalSwarm
from tests.helpers import run, wait_for_exits

HOP_LINE = re.compile(r"^round (\d+)/\d+", re.MULTILINE)


def recorded_rounds(folder) -> list[int]:
    path = folder / "metrics.jsonl"
    return [json.loads(line)["round"] for line in path.read_text().splitlines()] if path.exists() else []


def test_a_local_swarm_passes_its_peers_only_the_settings_given(tmp_path):
    args = LocalSwarm(SwarmConfig(peers=5, algorithm="srrw", tokens=2), tmp_path)._common
    assert args[args.index("--algorithm") + 1] == "srrw" and args[args.index("--tokens") + 1] == "2"
    assert "--lr-schedule" not in args  # a peer refuses it with srrw, even at its default
    assert "--alpha" not in args  # the peer's default is the same


@pytest.mark.network
def test_a_swarm_walks_two_tokens_to_their_last_hop(tmp_path):
    rounds = 6
    code, _, err = run(
        ["swarm", "--peers", "5", "--algorithm", "srrw", "--tokens", "2", "--rounds", str(rounds), "--local-steps", "1",
         "--partition", "iid", "--exchange-timeout", "20", "--out", str(tmp_path)], timeout=240,
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["peers_finished"] == 5 and summary["failed_peers"] == {}, summary
    assert summary["token_copies"] == [1, 1] and summary["tokens_reissued"] == 0, summary
    assert summary["rejected_total"] == 0 and (summary["tokens"], summary["alpha"]) == (2, 5.0)
    # Only the holder records a hop: over the swarm, each hop once per token.
    hops = sorted(r for i in range(5) for r in recorded_rounds(tmp_path / f"peer-{i}"))
    assert hops == sorted(list(range(rounds)) * 2)
    finished = []
    for index in range(5):
        peer = json.loads((tmp_path / f"peer-{index}" / "summary.json").read_text())
        assert peer["rounds_completed"] == rounds and peer["tokens_reissued"] == 0, peer
        assert 0 <= peer["mean_accuracy"] <= 1  # the last token model it trained, evaluated at the end
        finished += [(int(token), key) for token, key in peer["tokens_held"].items()]
        assert "Traceback" not in (tmp_path / f"peer-{index}" / "log.txt").read_text()
    assert sorted(finished) == [(0, [0, rounds]), (1, [0, rounds])]  # each token rests where it made its last hop


def hops_logged(swarm: LocalSwarm, index: int) -> list[int]:
    return [int(hop) for hop in HOP_LINE.findall((swarm.folder(index) / "log.txt").read_text())]


@pytest.mark.network
def test_a_token_whose_holder_is_killed_is_reissued_and_the_survivors_finish(tmp_path):
    rounds, patience, pace = 8, 3, 2
    # --exchange-timeout is also the custodian's patience; --pace makes each visit last 2 s, so the
    # holder still has the token when it is killed just after it logs its hop.
    config = SwarmConfig(
        peers=5, rounds=rounds, algorithm="srrw", tokens=1, local_steps=1, partition="iid",
        exchange_timeout=patience, join_timeout=90,
    )
    swarm = LocalSwarm(config, tmp_path, extra_args=("--pace", str(pace), "--record-ttl", "4"))
    try:
        swarm.bootstrap()
        deadline = time.monotonic() + 120
        while max((hop for i in swarm.processes for hop in hops_logged(swarm, i)), default=0) < 2:
            assert time.monotonic() < deadline, "the token did not make two hops"
            assert all(p.poll() is None for p in swarm.processes.values()), "a peer exited early"
            time.sleep(0.05)
        hop, holder = max((max(hops_logged(swarm, i), default=0), i) for i in swarm.processes)
        assert hop < rounds, "the run was over before the holder could be killed"
        swarm.kill(holder)
        survivors = [i for i in swarm.processes if i != holder]
        seen = {i: len(hops_logged(swarm, i)) for i in survivors}
        # The custodian waits out its patience, finds the holder gone, and hands its copy to another
        # neighbour, which redoes the lost visit.
        deadline = time.monotonic() + 2 * patience + pace + 30
        while not (later := [h for i in survivors for h in hops_logged(swarm, i)[seen[i]:]]):
            assert time.monotonic() < deadline, "no survivor logged a hop after the holder was killed"
            time.sleep(0.1)
        assert min(later) >= hop, (hop, later)
        wait_for_exits([swarm.processes[i] for i in survivors], 120, "the survivors")
    finally:
        swarm.stop()
    logs = "\n".join((swarm.folder(i) / "log.txt").read_text() for i in survivors)
    assert [swarm.processes[i].returncode for i in survivors] == [0] * 4, logs
    assert "Traceback" not in logs and "re-issuing it" in logs
    summaries = swarm.summaries()
    assert sorted(summaries) == survivors  # the killed peer wrote nothing
    held = []
    for index in survivors:
        summary = summaries[index]
        assert summary["rounds_completed"] == rounds and 0 <= summary["mean_accuracy"] <= 1, summary
        held += list(summary["tokens_held"].values())
    assert sum(s["tokens_reissued"] for s in summaries.values()) >= 1
    (generation, last_hop), = held  # one copy walked on to the end, a generation up
    assert generation >= 1 and last_hop == rounds
    recorded = {r for i in swarm.processes for r in recorded_rounds(swarm.folder(i))}
    assert recorded == set(range(rounds))  # every hop was visited, the lost one again
