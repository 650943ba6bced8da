"""DiLoCo between real peers on loopback: with one peer SIGKILLed mid-run, the others finish every
outer round, streamed through hivemind's all-reduce (fragments in turn, each combined while the next
inner steps run) and through random pairs with 4-bit pseudo-gradients alike."""

import pytest

from peer.config import SwarmConfig
from peer.net.swarm import LocalSwarm
from tests.helpers import records, run_with_a_peer_killed

pytestmark = pytest.mark.network


def our_tracebacks(logs: str) -> list[str]:
    """The tracebacks in the logs other than hivemind's own report of an all-reduce that a killed
    member broke (it logs one for every such round, which the survivors then refuse, as they should)."""
    blocks = logs.split("Traceback (most recent call last):")[1:]
    return [block[:600] for block in blocks if "in _aggregate_with_group" not in block[:400]]


STREAMED = {"outer_mix": "all", "fragments": 2, "overlap": 5, "codec": "fp16"}
PAIRS = {"outer_mix": "gossip:1", "codec": "quant:4"}


@pytest.mark.parametrize("settings", [STREAMED, PAIRS], ids=["streamed-all", "pairs-quant4"])
def test_the_survivors_finish_every_outer_round_after_a_peer_is_killed(tmp_path, settings):
    rounds = 8
    config = SwarmConfig(
        peers=4, rounds=rounds, algorithm="diloco", local_steps=5, partition="iid", exchange_timeout=8,
        join_timeout=90, **settings,
    )
    # --pace: a round takes at least 1.5 s, so that the victim dies while the run goes on.
    swarm = LocalSwarm(config, tmp_path, extra_args=("--pace", "1.5"))
    survivors, killed_at, logs = run_with_a_peer_killed(swarm, victim=3, rounds=rounds)
    summaries = swarm.summaries()
    assert all(summaries[i]["rounds_completed"] == rounds for i in survivors)
    # After the crash every survivor still averaged with others (in pairs, one of three left over each round).
    later = {i: [r["neighbours_heard"] for r in records(swarm, i) if r["round"] > killed_at + 1] for i in survivors}
    assert all(max(heard) >= 1 for heard in later.values()), later
    assert our_tracebacks(logs) == []
