"""MoDeST between real peers: a peer of one protocol family never mixes with another, and a
sampling swarm on loopback goes on, and finishes, after most of its peers crash."""

import json

import pytest
import torch

from gossip.settings import GossipSettings
from peer.config import SwarmConfig
from peer.net.node import fingerprint
from peer.net.swarm import LocalSwarm, final_accuracies
from tests.helpers import wait_for_exits, wait_for_round

STATE = {"layer.weight": torch.zeros(3, 4), "layer.bias": torch.zeros(3)}


def test_a_modest_peer_and_a_gossip_peer_have_different_fingerprints():
    gossip = GossipSettings()
    dpsgd, dfedsam, modest = (fingerprint("mnist1d", STATE, gossip, a) for a in ("dpsgd", "dfedsam", "modest"))
    assert modest != dpsgd
    assert dpsgd == dfedsam  # D-PSGD and DFedSAM peers gossip together
    assert modest == fingerprint("mnist1d", STATE, gossip, "modest")
    assert fingerprint("other", STATE, gossip, "modest") != modest


def records(swarm: LocalSwarm, index: int) -> list[dict]:
    path = swarm.folder(index) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_swarm_progress_counts_the_highest_round_with_modest(tmp_path):
    swarm = LocalSwarm(SwarmConfig(peers=3, rounds=5, algorithm="modest", sample_size=2), tmp_path)
    swarm.processes = {0: None, 1: None, 2: None}  # only their folders are read
    for index in range(3):
        swarm.folder(index).mkdir()
    (swarm.folder(1) / "metrics.jsonl").write_text('{"round": 0}\n{"round": 2}\n{"round": 3')  # the last line is being written
    assert swarm.last_round(0) == -1 and swarm.last_round(1) == 2
    assert swarm.rounds_done() == 3 * 3  # rounds 0..2, done for the whole swarm


def test_a_local_modest_swarm_samples_no_more_peers_than_it_has(tmp_path):
    def sample_size(config):
        args = LocalSwarm(config, tmp_path)._common
        return args[args.index("--sample-size") + 1] if "--sample-size" in args else None

    assert sample_size(SwarmConfig(peers=3, algorithm="modest")) == "3"  # not the default 10
    assert sample_size(SwarmConfig(peers=12, algorithm="modest")) == "10"
    assert sample_size(SwarmConfig(peers=12, algorithm="modest", sample_size=4)) == "4"
    assert sample_size(SwarmConfig(peers=3)) is None


def test_the_swarm_accuracy_is_that_of_the_peers_holding_the_final_model_or_else_of_every_peer():
    summaries = [
        {"mean_accuracy": 0.5, "final_model": False}, {"mean_accuracy": 0.8, "final_model": True},
        {"mean_accuracy": 0.9, "final_model": True}, {"mean_accuracy": None, "final_model": True},
    ]
    assert final_accuracies(summaries) == [0.8, 0.9]  # the last aggregate, as its holders evaluated it
    everyone = [{**summary, "final_model": False} for summary in summaries]
    assert final_accuracies(everyone) == [0.5, 0.8, 0.9]  # gossip: each peer's last evaluation
    assert final_accuracies([]) == []


@pytest.mark.network
def test_modest_survivors_go_on_after_most_peers_crash(tmp_path):
    rounds, victims, survivors = 6, [1, 2, 3], [0, 4]
    config = SwarmConfig(
        peers=5, rounds=rounds, algorithm="modest", sample_size=3, aggregators=2, ping_timeout=1,
        aggregation_timeout=3, round_timeout=6, local_steps=2, partition="iid", exchange_timeout=5, join_timeout=90,
    )
    # --pace: a round takes at least 1 s, so that the peers die while the run goes on.
    swarm = LocalSwarm(config, tmp_path, extra_args=("--pace", "1"))
    try:
        swarm.bootstrap()
        wait_for_round(swarm, 1, 120)
        for index in victims:
            swarm.kill(index)
        killed_at = max(swarm.last_round(i) for i in swarm.processes)
        assert killed_at < rounds - 2, "the run was almost over before the peers crashed"
        wait_for_exits([swarm.processes[i] for i in survivors], 90, "the survivors")
    finally:
        swarm.stop()
    logs = "\n".join((swarm.folder(i) / "log.txt").read_text() for i in survivors)
    assert [swarm.processes[i].returncode for i in survivors] == [0, 0], logs
    after = sorted({r["round"] for i in survivors for r in records(swarm, i) if r["round"] > killed_at})
    assert after == list(range(killed_at + 1, rounds)), (killed_at, after, logs)  # every later round, to the last
    summaries = swarm.summaries()
    for index in survivors:
        summary = summaries[index]
        assert summary["rounds_completed"] == rounds and summary["final_model"], summary
        assert 0 <= summary["mean_accuracy"] <= 1
        assert (summary["sample_size"], summary["aggregators"]) == (3, 2)
    assert "Traceback" not in logs
