"""Epidemic gossip between real peers on loopback: each peer pushes its model to peers it draws
from its view of the live swarm every round, and the swarm finishes with one peer SIGKILLed mid-run."""

import pytest

from peer.config import SwarmConfig
from peer.net.swarm import LocalSwarm
from tests.helpers import records, run_with_a_peer_killed

pytestmark = pytest.mark.network


def test_a_swarm_on_el_local_finishes_every_round_after_a_peer_is_killed(tmp_path):
    rounds = 10
    config = SwarmConfig(
        peers=6, rounds=rounds, topology="el-local:2", local_steps=5, partition="iid", exchange_timeout=6,
        join_timeout=90,
    )
    # --pace: a round takes at least 1.5 s, so that the victim dies while the run goes on.
    swarm = LocalSwarm(config, tmp_path, extra_args=("--pace", "1.5"))
    survivors, killed_at, logs = run_with_a_peer_killed(swarm, victim=5, rounds=rounds)
    summaries = swarm.summaries()
    assert all(summaries[i]["rounds_completed"] == rounds for i in survivors)
    assert all(summaries[i]["rejected_total"] == 0 for i in survivors), logs
    # Models kept arriving after the crash: the survivors drew each other.
    heard = [r["neighbours_heard"] for i in survivors for r in records(swarm, i) if r["round"] > killed_at + 2]
    assert sum(heard) > 0
    assert "Traceback" not in logs
