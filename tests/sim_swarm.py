"""Peers with vector models gossiping on the simulator, for protocol tests."""

from __future__ import annotations

import asyncio

from gossip.neighbourhood import GraphNeighbourhood
from gossip.protocols import DPSGD, ProtocolContext
from gossip.settings import GossipSettings
from peer.sim import LinkModel, SimClock, SimNetwork, VirtualTimeLoop
from tests.vector_learner import VectorLearner


def run(coroutine):
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coroutine)


def build_gossip(topology, values, *, settings=None, network=None, protocol=DPSGD, gossip_steps=1):
    """One ``protocol`` per value on ``topology``; returns (network, ids, learners, protocols, reports)."""
    network = network or SimNetwork(LinkModel(latency=0.01))
    settings = settings or GossipSettings()
    ids = [f"p{i}" for i in range(topology.n)]
    clock = SimClock()
    learners, protocols, reports = [], [], {peer: [] for peer in ids}
    for peer, value in zip(ids, values):
        learner = VectorLearner(value)

        async def finished(report, peer=peer):
            reports[peer].append(report)

        context = ProtocolContext(
            network.attach(peer), clock, learner, GraphNeighbourhood(topology, ids, peer), finished, settings
        )
        learners.append(learner)
        protocols.append(protocol(context, local_steps=1, gossip_steps=gossip_steps))
    return network, ids, learners, protocols, reports
