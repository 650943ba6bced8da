"""Peers with vector models on the simulator, for protocol tests: D-PSGD-like gossip on a topology,
a MoDeST swarm, and an SRRW walk."""

from __future__ import annotations

import asyncio

import torch

from gossip.neighbourhood import GraphNeighbourhood
from gossip.protocols import DPSGD, MoDeST, ModestSettings, ProtocolContext
from gossip.protocols.srrw import SRRW, WalkSettings, start_peer
from gossip.sampling import hash_order
from gossip.settings import GossipSettings
from peer.sim import LinkModel, SimClock, SimNetwork, SpeedProfile, VirtualTimeLoop
from tests.vector_learner import VectorLearner
from topology import parse_topology


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


# --- MoDeST ---------------------------------------------------------------------------------

MODEST_FAST = {"ping_timeout": 1.0, "aggregation_timeout": 3.0, "round_timeout": 6.0, "heartbeat": 2.0}


class ModestSwarm:
    """One MoDeST per peer (``p00``, ``p01``, ...), each a vector model that drifts by 1 a step."""

    def __init__(self, n, *, rounds, network=None, known=None, codec="none", size=1, **settings):
        self.network = network or SimNetwork(LinkModel(latency=0.01))
        self.rounds = rounds
        self.ids = [f"p{i:02d}" for i in range(n)]
        self.settings = ModestSettings(**{**MODEST_FAST, **settings})
        self.clock = SimClock()
        self.reports = []  # (aggregator, report)
        self.learners, self.protocols, self.tasks = {}, {}, {}
        self.on_report = None
        self.gossip = GossipSettings(timeout=5.0, codec=codec)
        self.size = size  # of each peer's vector model
        for peer in self.ids:
            self.add(peer, peers=known or self.ids)

    def add(self, peer, *, peers, joining=False):
        learner = VectorLearner(torch.full((self.size,), float(int(peer[1:]))), drift=1.0)

        async def finished(report, peer=peer):
            self.reports.append((peer, report))
            if self.on_report:
                self.on_report(peer, report)

        context = ProtocolContext(self.network.attach(peer), self.clock, learner, None, finished, self.gossip)
        self.learners[peer] = learner
        self.protocols[peer] = MoDeST(context, local_steps=1, settings=self.settings, peers=peers, joining=joining)

    def start(self, peer):
        self.tasks[peer] = asyncio.get_running_loop().create_task(self.protocols[peer].run(self.rounds))

    def crash(self, peer):
        self.network.crash(peer)
        self.tasks[peer].cancel()

    async def run(self):
        for peer in self.protocols:
            if peer not in self.tasks:
                self.start(peer)
        async with asyncio.timeout(100_000):
            while pending := [t for t in self.tasks.values() if not t.done()]:
                await asyncio.wait(pending)

    def rounds_reported(self):
        return sorted({report.round for _, report in self.reports})

    def live(self):
        return [peer for peer in self.ids if self.network.is_up(peer)]


def evil_member(swarm, rounds):
    """A peer of the swarm's world, left out of every sample (it said it left), and not among the
    peers that could aggregate the last round: everything it claims about the run's end is a lie."""
    name = next(f"p{i}" for i in range(90, 100) if f"p{i}" not in hash_order([*swarm.ids, f"p{i}"], rounds - 1)[:3])
    swarm.add(name, peers=swarm.ids)
    evil = swarm.protocols[name]
    evil.view.announce(left=True)
    return evil


# --- SRRW -----------------------------------------------------------------------------------

# Virtual seconds within which every test's walk ends; past them a test fails rather than spins.
DEADLINE = 3_600.0


class Walk:
    """One SRRW per peer of a topology on the simulator; ``visits`` lists (peer, round) in the order of visits."""

    def __init__(
        self, spec="ring", n=5, *, rounds, seed=0, timeout=1.0, network=None, seconds_per_step=0.01, **walk
    ):
        self.network = network or SimNetwork(LinkModel(latency=0.01))
        self.topology = parse_topology(spec, n)
        self.ids = [f"p{i}" for i in range(n)]
        self.rounds = rounds
        self.seed = seed
        self.settings = WalkSettings(**{"patience": 2.0, **walk})
        self.gossip = GossipSettings(timeout=timeout)
        self.clock = SimClock(SpeedProfile(seconds_per_step))
        self.learners = {peer: VectorLearner(torch.tensor([self.initial(peer)]), drift=1.0) for peer in self.ids}
        self.visits: list[tuple[str, int]] = []
        self.on_visit = None  # called with (peer, round) after each visit is recorded
        self.protocols: dict[str, SRRW] = {}  # each peer's current protocol (a restarted peer's new one)
        self.neighbourhoods: dict[str, GraphNeighbourhood] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        for peer in self.ids:
            self._add(peer, self.network.attach(peer), joining=False)

    def _add(self, peer, transport, *, joining):
        async def finished(report, peer=peer):
            self.visits.append((peer, report.round))
            if self.on_visit:
                self.on_visit(peer, report.round)

        neighbourhood = self.neighbourhoods.setdefault(peer, GraphNeighbourhood(self.topology, self.ids, peer))
        context = ProtocolContext(transport, self.clock, self.learners[peer], neighbourhood, finished, self.gossip)
        self.protocols[peer] = SRRW(
            context, local_steps=1, settings=self.settings, peers=self.ids, seed=self.seed, joining=joining
        )

    def start(self, peer):
        self.tasks[peer] = asyncio.get_running_loop().create_task(self.protocols[peer].run(self.rounds))

    def crash(self, peer):
        """The peer's process dies: it neither sends nor receives, and its protocol stops."""
        self.network.crash(peer)
        self.tasks[peer].cancel()

    def restart(self, peer):
        """The peer comes back as a fresh process, its memory of the walk gone (its model kept)."""
        self._add(peer, self.network.restart(peer), joining=True)
        self.start(peer)

    async def run(self, *also):
        """Run every peer (and the coroutines ``also``) until every live peer's run has ended."""
        for peer in self.ids:
            self.start(peer)
        extras = [asyncio.get_running_loop().create_task(coroutine) for coroutine in also]
        async with asyncio.timeout(DEADLINE):
            while pending := [task for task in self.tasks.values() if not task.done()]:
                await asyncio.wait(pending)
            await asyncio.gather(*extras)
        for task in self.tasks.values():
            if not task.cancelled():
                task.result()  # a protocol that failed fails the test

    def live(self):
        return [peer for peer in self.ids if self.network.is_up(peer)]

    def live_copies(self):
        """Every (peer, token id, (generation, hop)) held now by a live peer."""
        return [
            (peer, token_id, key)
            for peer in self.live()
            for token_id, key in self.protocols[peer].held().items()
        ]

    def holders(self):
        return [peer for peer, _ in self.visits]

    def initial(self, peer):
        return 1000.0 + 100.0 * self.ids.index(peer)

    def start_value(self, token_id=0):
        return self.initial(start_peer(self.ids, token_id, self.seed))

    def value(self, peer):
        return self.learners[peer].value.item()

    def rejections(self, peer):
        return self.network._endpoints[peer].counters.rejections


def assert_walk_unaffected(walk: Walk):
    assert [round_ for _, round_ in walk.visits] == list(range(walk.rounds))
    assert walk.value(walk.holders()[-1]) == walk.start_value() + walk.rounds
    assert walk.live_copies() == [(walk.holders()[-1], 0, (0, walk.rounds))]


# --- DiLoCo ---------------------------------------------------------------------------------


class OuterSwarm:
    """One DiLoCo per peer (``p0``, ``p1``, ...), each a vector model that starts at ``start`` and
    drifts by its own amount a step (peer i by ``drifts[i]``), so that every outer step is predictable."""

    def __init__(self, drifts, *, mix="all", rounds, local_steps=1, start=0.0, codec="none", timeout=5.0,
                 optimizer="nesterov", lr=0.7, momentum=0.9, network=None, parts=1, streaming=None, feedback="residual"):
        from gossip.outer import ErrorFeedback, OuterOptimizer
        from gossip.protocols.diloco import OuterMix, Streaming
        from peer.sim.averaging import AveragingRoom

        self.network = network or SimNetwork(LinkModel(latency=0.01))
        self.ids = [f"p{i}" for i in range(len(drifts))]
        self.rounds, self.local_steps = rounds, local_steps
        self.mix = OuterMix.parse(mix)
        self.gossip = GossipSettings(timeout=timeout, codec=codec)
        self.room = AveragingRoom(self.network, self.gossip.codec)
        self.topology = parse_topology("ring", len(drifts))
        self.clock = SimClock()
        self.outer = lambda: OuterOptimizer(optimizer, lr, momentum)
        self.streaming = streaming or Streaming()
        self.feedback = lambda: ErrorFeedback.parse(feedback)
        self.learners = {
            peer: VectorLearner(torch.full((parts,), float(start)), drift=d, parts=parts) for peer, d in zip(self.ids, drifts)
        }
        self.reports = {peer: [] for peer in self.ids}
        self.protocols, self.tasks = {}, {}
        for peer in self.ids:
            self.add(peer, self.network.attach(peer))

    def add(self, peer, transport, *, joining=False):
        from gossip.protocols.diloco import DiLoCo

        async def finished(report, peer=peer):
            self.reports[peer].append(report)

        neighbourhood = GraphNeighbourhood(self.topology, self.ids, peer) if self.mix.kind == "neighbours" else None
        context = ProtocolContext(
            transport, self.clock, self.learners[peer], neighbourhood, finished, self.gossip,
            averaging=self.room.join(peer) if self.mix.kind == "all" else None,
        )
        self.protocols[peer] = DiLoCo(
            context, self.mix, self.outer(), local_steps=self.local_steps, joining=joining, streaming=self.streaming,
            feedback=self.feedback(),
        )
        return self.protocols[peer]

    def start(self, peer, first_round=0):
        self.tasks[peer] = asyncio.get_running_loop().create_task(self.protocols[peer].run(self.rounds, first_round))

    def arrive(self, peer, drift):
        """A newcomer, started at once: it asks a running peer where the swarm is."""
        self.ids.append(peer)
        self.learners[peer] = VectorLearner(torch.tensor([-100.0]), drift=drift)
        self.reports[peer] = []
        self.add(peer, self.network.attach(peer), joining=True)
        self.start(peer)

    def crash(self, peer):
        self.network.crash(peer)
        self.tasks[peer].cancel()

    async def run(self, first_round=0):
        for peer in self.ids:
            if peer not in self.tasks:
                self.start(peer, first_round)
        async with asyncio.timeout(100_000):
            while pending := [t for t in self.tasks.values() if not t.done()]:
                await asyncio.wait(pending)
        for task in self.tasks.values():
            if not task.cancelled():
                task.result()

    def values(self):
        return {peer: learner.value.item() for peer, learner in self.learners.items()}

    def vectors(self):
        return {peer: learner.value.tolist() for peer, learner in self.learners.items()}
