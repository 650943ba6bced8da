"""Asynchronous gossip between real peer processes on loopback: a peer slowed down 4x holds
nobody back. Bounded in time; every process is cleaned up."""

import json

import pytest

from peer.config import SwarmConfig
from peer.net.swarm import LocalSwarm
from tests.helpers import run


def records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_local_swarm_gives_each_peer_its_slowdown_and_adaptive_steps(tmp_path):
    swarm = LocalSwarm(
        SwarmConfig(peers=4, algorithm="async-gossip", local_steps="adaptive:6", speeds="stragglers:0.25:4"), tmp_path
    )
    assert sorted(swarm.slowdowns) == [1, 1, 1, 4]
    assert swarm._common[swarm._common.index("--local-steps") + 1] == "adaptive:6"
    assert "--adaptive-steps" not in swarm._common


def peer_summary(tmp_path, peer: str) -> dict:
    return json.loads((tmp_path / "run" / peer / "summary.json").read_text())


@pytest.mark.network
def test_fast_peers_finish_their_iterations_without_waiting_for_a_slowed_down_one(tmp_path):
    speeds = tmp_path / "speeds.txt"
    speeds.write_text("1\n4\n1\n")
    rounds = 40
    # 50 local steps an iteration: the fast peers' run lasts a few seconds, so one that a loaded host
    # holds up for half a second still does many more iterations of its own than the slow peer.
    code, _, err = run(
        ["swarm", "--peers", "3", "--algorithm", "async-gossip", "--speeds", f"file:{speeds}", "--rounds", str(rounds),
         "--local-steps", "50", "--partition", "iid", "--topology", "complete", "--out", str(tmp_path / "run")],
        timeout=240,
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["peers_finished"] == 3 and summary["failed_peers"] == {}, summary
    assert summary["slowdowns"] == [1, 4, 1] and summary["rejected_total"] == 0
    assert summary["mean_accuracy_slow"] is not None and summary["mean_accuracy_fast"] is not None
    slow = records(tmp_path / "run" / "peer-1")
    assert peer_summary(tmp_path, "peer-1")["slowdown"] == 4
    for fast in ("peer-0", "peer-2"):
        lines = records(tmp_path / "run" / fast)
        iterations = [line["round"] for line in lines]
        # To the last iteration, in order: it may skip iterations to keep up with the other fast peer,
        # but never the last (a jump goes no further), which is evaluated.
        assert iterations[-1] == rounds - 1 and iterations == sorted(set(iterations))
        assert peer_summary(tmp_path, fast)["rounds_completed"] == rounds
        assert lines[-1]["accuracy"] is not None
        # At its own pace: more iterations of its own than the slow peer did.
        assert len(lines) > len(slow)
        assert "Traceback" not in (tmp_path / "run" / fast / "log.txt").read_text()
    # The slow peer jumped to where the others were instead of being waited for, and ended with them:
    # it finished the run, its last iteration included, in fewer than half its iterations.
    assert len(slow) < rounds / 2 and slow[-1]["round"] == rounds - 1
    assert peer_summary(tmp_path, "peer-1")["rounds_completed"] == rounds
