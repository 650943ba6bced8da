"""Neighbours whose rounds drifted far apart (a long pause, a partition) meet again and mix."""

import asyncio
import itertools
import json
import os
import signal
import time

import pytest
import torch

from gossip.neighbourhood import GraphNeighbourhood
from gossip.protocols import DPSGD, DFedSAM, ProtocolContext
from gossip.settings import GossipSettings
from peer.config import SwarmConfig
from peer.net.swarm import LocalSwarm
from peer.sim import LinkModel, SimClock, SimNetwork
from tests.sim_swarm import run
from tests.vector_learner import VectorLearner
from topology import parse_topology

# Each case: the protocol, its gossip settings, and its gossip steps per round.
EXCHANGES = {
    "dpsgd": (DPSGD, {}, 1),
    "dfedsam-mgs": (DFedSAM, {}, 2),
    "dpsgd-int8-choco": (DPSGD, {"codec": "int8", "error_feedback": "choco"}, 1),
}


def build(n, case, timeouts):
    """A ring of ``n`` peers running ``case``, peer i waiting ``timeouts[i]`` for a model.

    Returns (network, ids, protocols, reports): each report comes with the virtual time it was made.
    """
    protocol, settings, gossip_steps = EXCHANGES[case]
    topology = parse_topology("ring", n)
    network = SimNetwork(LinkModel(latency=0.01))
    ids = [f"p{i}" for i in range(n)]
    reports = {peer: [] for peer in ids}
    protocols = []
    for i, peer in enumerate(ids):

        async def finished(report, peer=peer):
            reports[peer].append((asyncio.get_running_loop().time(), report))

        context = ProtocolContext(
            network.attach(peer), SimClock(), VectorLearner(torch.full((4,), float(i))),
            GraphNeighbourhood(topology, ids, peer), finished, GossipSettings(timeout=timeouts[i], **settings),
        )
        protocols.append(protocol(context, local_steps=1, gossip_steps=gossip_steps))
    return network, ids, protocols, reports


def heard_all(report) -> bool:
    return report.neighbours_heard == report.neighbours_expected > 0


@pytest.mark.parametrize("case", EXCHANGES)
def test_a_peer_back_from_a_long_pause_catches_up_and_mixes_again(case):
    rounds, pause = 80, 40.0
    _, ids, protocols, reports = build(4, case, [1.0] * 4)

    resumed = []

    async def paused(protocol):
        await protocol.run(5)
        await asyncio.sleep(pause)  # its neighbours go on, a timeout a round
        resumed.append(asyncio.get_running_loop().time())
        await protocol.run(rounds, first_round=5)

    async def main():
        await asyncio.gather(*(paused(p) if i == 1 else p.run(rounds) for i, p in enumerate(protocols)))

    run(main())
    rounds_of = {peer: [report.round for _, report in reports[peer]] for peer in ids}
    ahead = max(report.round for t, report in reports["p0"] if t <= resumed[0])
    assert ahead - 5 > 16  # further apart than a fixed horizon of 16 steps would let them mix
    # Back from its pause, p1 mixes its neighbours' models at once and moves on to their round.
    back = [report for _, report in reports["p1"][5:]]
    assert back[0].round == 5 and back[1].round >= ahead
    assert all(heard_all(report) for report in back), [(r.round, r.neighbours_heard) for r in back]
    # Its neighbours hear it again within a few rounds, and to the end.
    for neighbour in ("p0", "p2"):
        since = [report for t, report in reports[neighbour] if t > resumed[0]]
        assert all(heard_all(report) for report in since[3:]), [r.neighbours_heard for r in since]
    for peer in ids:
        assert rounds_of[peer][-1] == rounds - 1 and rounds_of[peer] == sorted(set(rounds_of[peer]))


@pytest.mark.parametrize("case", EXCHANGES)
def test_the_sides_of_a_partition_drift_apart_and_mix_again_once_it_heals(case):
    # One side waits 0.1 s for a missing model, the other 2 s: while cut off from each other, the
    # first runs ahead by many rounds (as a side of faster peers would).
    n, rounds, cut_at, heal_at = 8, 100, 0.5, 6.0
    side = {"p0", "p1", "p2", "p3"}
    network, ids, protocols, reports = build(n, case, [0.1 if f"p{i}" in side else 2.0 for i in range(n)])

    async def partition():
        await asyncio.sleep(cut_at)
        network.cut(side)
        await asyncio.sleep(heal_at - cut_at)
        network.heal()

    async def main():
        await asyncio.gather(partition(), *(p.run(rounds) for p in protocols))

    run(main())

    def last_round_before_heal(peers):
        return max(report.round for peer in peers for t, report in reports[peer] if t <= heal_at)

    fast, slow = last_round_before_heal(side), last_round_before_heal(set(ids) - side)
    assert fast - slow > 16
    for peer in ids:
        healed = [report for t, report in reports[peer] if t > heal_at]
        # Within a few rounds of the heal every peer mixes with both neighbours again, to the end.
        assert all(heard_all(report) for report in healed[5:]), (peer, [r.neighbours_heard for r in healed])
        assert healed[-1].round == rounds - 1
        if peer not in side:  # the slow side moved on to the fast side's round
            assert any(report.round > fast for report in healed[:5]), (peer, [r.round for r in healed])


@pytest.mark.parametrize("case", ["dpsgd", "dpsgd-int8-choco"])
def test_models_claiming_rounds_past_the_run_are_malformed_and_never_followed(case):
    rounds = 6
    network, _, protocols, reports = build(3, case, [1.0] * 3)
    mallory = network.attach("mallory")
    exchange, model = protocols[1].exchange, {"x": torch.zeros(4, dtype=torch.float64)}

    def valid(step):
        """A model that p1 could have sent, encoded as it encodes them."""
        if case == "dpsgd":
            return exchange._encode(step, model)
        return exchange._full_copy("p0", step, exchange._flat.flatten(model))[0]

    async def lie():
        # Posing as a neighbour, with a valid model for a round that the run does not have.
        for claim in (rounds, 2**60):
            await mallory.send("p0", valid(claim))

    async def main():
        await asyncio.gather(*(p.run(rounds) for p in protocols), lie())

    run(main())
    assert network._endpoints["p0"].counters.rejections == {"malformed": 2}
    assert [report.round for _, report in reports["p0"]] == list(range(rounds))
    assert all(heard_all(report) for _, report in reports["p0"])


def metrics(path):
    """The complete records of a metrics file written by a running peer."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()[: text.count("\n")] if line.strip()]


def poll(what, condition, deadline):
    while not (found := condition()):
        assert time.monotonic() < deadline, f"{what} did not happen in time"
        time.sleep(0.2)
    return found


@pytest.mark.network
def test_real_peers_meet_again_after_one_was_paused_far_behind(tmp_path):
    # Two real peers at a fast pace; one is stopped (as a laptop that sleeps) until the other,
    # which stops waiting for it and trains alone, is far ahead; once it wakes they mix again.
    config = SwarmConfig(
        peers=2, rounds=5000, local_steps=2, partition="iid", exchange_timeout=2.0, eval_every=50, seed=0,
    )
    swarm = LocalSwarm(config, tmp_path, extra_args=("--pace", "0.1", "--record-ttl", "4"))
    ahead, behind = (tmp_path / f"peer-{i}" / "metrics.jsonl" for i in range(2))
    deadline = time.monotonic() + 180
    try:
        swarm.bootstrap()
        poll("mixing", lambda: any(r["neighbours_heard"] for r in metrics(behind)[3:]), deadline)
        os.killpg(swarm.processes[1].pid, signal.SIGSTOP)  # the peer, its DHT process and its daemon
        paused_at = metrics(behind)[-1]["round"]
        poll("running ahead", lambda: metrics(ahead)[-1]["round"] > paused_at + 30, deadline)
        resumed_at = metrics(ahead)[-1]["round"]
        os.killpg(swarm.processes[1].pid, signal.SIGCONT)
        caught_up = poll(
            "catching up", lambda: [r for r in metrics(behind) if r["round"] >= resumed_at and r["neighbours_heard"]], deadline
        )
        poll("hearing the peer that was paused", lambda: [
            r for r in metrics(ahead) if r["round"] > caught_up[0]["round"] and r["neighbours_heard"]
        ], deadline)
    finally:
        for index in swarm.processes:
            swarm.kill(index)  # stopped or not, with everything it started
    rounds = [r["round"] for r in metrics(behind)]
    assert any(b - a > 16 for a, b in itertools.pairwise(rounds)), rounds  # it jumped to the other's round
    assert rounds == sorted(set(rounds))


def test_a_peer_jumps_to_the_round_that_half_its_neighbours_reached_and_no_lone_neighbour_moves_it():
    from gossip.exchange import most_have_reached

    assert most_have_reached(5, [43, 43], 2) == 43  # back from a pause
    assert most_have_reached(5, [5, 40], 2) == 40  # on the edge of a healed cut
    assert most_have_reached(5, [5, 5, 5, 99], 4) == 5  # one liar among four
    assert most_have_reached(5, [5, 99], 4) == 5  # the silent ones count as at our step
    assert most_have_reached(5, [60, 99], 4) == 60
    assert most_have_reached(7, [], 4) == 7
