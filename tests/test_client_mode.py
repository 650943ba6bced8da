"""Peers that accept no connections (client mode): laid out among reachable peers, never dialled,
and still mixing every round by pulling their neighbours' models."""

import asyncio

import numpy as np
import pytest
import torch

from gossip.message import Message
from gossip.neighbourhood import OverlayNeighbourhood, spread
from gossip.protocols import DPSGD, ProtocolContext
from gossip.settings import GossipSettings
from gossip.transport import PeerUnreachable, Transport
from peer.sim import LinkModel, SimClock, SimNetwork
from tests.sim_swarm import run
from tests.vector_learner import VectorLearner
from topology import parse_topology


class NoDialsTo(Transport):
    """A peer's transport that, like a client behind a NAT, cannot be dialled: opening a stream to
    one of ``clients`` fails, and is logged in ``dials``."""

    def __init__(self, inner, clients, dials):
        self.inner, self.clients, self.dials = inner, clients, dials
        self.peer_id, self.counters = inner.peer_id, inner.counters

    def serve(self, kind, handler):
        self.inner.serve(kind, handler)

    def reachable(self):
        return self.inner.reachable()

    def _dial(self, peer):
        if peer in self.clients:
            self.dials.append((self.peer_id, peer))
            raise PeerUnreachable(f"{peer} accepts no connections")

    async def send(self, peer, message: Message):
        self._dial(peer)
        await self.inner.send(peer, message)

    async def request(self, peer, message: Message, timeout):
        self._dial(peer)
        return await self.inner.request(peer, message, timeout)


def test_clients_are_spread_among_reachable_peers():
    assert spread(["a", "b", "c"], ["x", "y"]) == ["a", "x", "b", "y", "c"]
    assert spread(["a", "b"], ["x", "y", "z", "w"]) == ["a", "x", "y", "b", "z", "w"]
    assert spread([], ["x"]) == ["x"] and spread(["a"], []) == ["a"]


@pytest.mark.parametrize("spec", ["complete", "ring", "regular:4"])
def test_links_between_clients_fold_into_the_self_weights_and_keep_the_matrix_doubly_stochastic(spec):
    topology = parse_topology(spec, 8, seed=1)
    folded = topology.without_links_among({1, 3, 5})
    w = folded.mixing_matrix(0)
    assert np.allclose(w.sum(axis=0), 1) and np.allclose(w.sum(axis=1), 1) and np.allclose(w, w.T)
    assert all(w[i, j] == 0 for i in (1, 3, 5) for j in (1, 3, 5) if i != j)
    original = topology.mixing_matrix(0)
    assert np.array_equal(w[np.ix_([0, 2, 4, 6, 7], [0, 2, 4, 6, 7])], original[np.ix_([0, 2, 4, 6, 7], [0, 2, 4, 6, 7])])
    assert not any(folded.graph.has_edge(i, j) for i in (1, 3, 5) for j in (1, 3, 5))


def swarm_with_clients(spec, n, clients, rounds):
    network = SimNetwork(LinkModel(latency=0.01))
    ids = [f"p{i}" for i in range(n)]
    clock, dials = SimClock(), []
    learners, reports, protocols = {}, {peer: [] for peer in ids}, []
    for index, peer in enumerate(ids):
        learners[peer] = VectorLearner(torch.tensor([float(index)]))

        async def finished(report, peer=peer):
            reports[peer].append(report)

        neighbourhood = OverlayNeighbourhood(spec, peer, lambda: ids, clients=lambda: clients)
        context = ProtocolContext(
            NoDialsTo(network.attach(peer), clients, dials), clock, learners[peer], neighbourhood, finished,
            GossipSettings(timeout=5.0),
        )
        protocols.append(DPSGD(context, local_steps=1))

    async def main():
        async with asyncio.timeout(10_000):
            await asyncio.gather(*(protocol.run(rounds) for protocol in protocols))

    run(main())
    return learners, reports, dials


@pytest.mark.parametrize("spec", ["ring", "complete"])
def test_clients_pull_every_neighbours_model_and_nobody_dials_them(spec):
    clients = {"p1", "p4"}
    learners, reports, dials = swarm_with_clients(spec, 6, clients, rounds=60)
    assert dials == []
    for peer, peer_reports in reports.items():
        assert len(peer_reports) == 60
        # Nobody missed a model: the clients pulled theirs, the others were sent theirs.
        assert all(r.neighbours_heard == r.neighbours_expected > 0 for r in peer_reports), peer
    values = [float(learner.value[0]) for learner in learners.values()]
    assert values == pytest.approx([2.5] * 6, abs=1e-3)  # the average of 0..5, kept and agreed on


def test_a_record_says_whether_its_peer_accepts_connections():
    from peer.net.membership import Membership, PeerRecord

    record = {"peer_id": "c", "addresses": [], "fingerprint": "abc", "round": 2, "client": True}
    assert PeerRecord.parse("c", record).client
    assert not PeerRecord.parse("c", {**record, "client": "yes"}).client  # only a true boolean counts
    assert not PeerRecord.parse("c", {k: v for k, v in record.items() if k != "client"}).client
    membership = Membership(None, "swarm", PeerRecord("me", ["/ip4/127.0.0.1/tcp/1"], "abc", 0), ttl=10)
    membership.live = {"me": membership.record, "c": PeerRecord.parse("c", record)}
    assert membership.clients() == {"c"}


@pytest.mark.parametrize("clients, answered", [(set(), False), ({"p1"}, True)], ids=["not-a-client", "client"])
def test_only_a_neighbour_in_client_mode_is_answered_a_pull(clients, answered):
    from gossip.exchange import MODEL_PULL, NeighbourExchange

    network, clock = SimNetwork(LinkModel(latency=0.01)), SimClock()
    ids = ["p0", "p1"]
    transports = {peer: network.attach(peer) for peer in ids}
    server = NeighbourExchange(
        transports["p0"], clock, OverlayNeighbourhood("ring", "p0", lambda: ids, clients=lambda: clients),
        {"w": torch.zeros(2)}, timeout=5.0,
    )

    async def main():
        asyncio.get_running_loop().call_later(1.0, lambda: asyncio.ensure_future(server.step(0, {"w": torch.ones(2)})))
        return await transports["p1"].request("p0", Message(MODEL_PULL, "p1", 0), timeout=10.0)

    reply = run(main())
    assert reply.sender == "p0" and bool(reply.tensors) == answered


def test_a_client_asks_again_while_its_neighbour_has_not_read_its_record_yet():
    from gossip.exchange import NeighbourExchange

    network, clock = SimNetwork(LinkModel(latency=0.01)), SimClock()
    server_view = ["p0"]  # it reads the client's record two seconds after the client has read its
    exchanges = {
        peer: NeighbourExchange(
            network.attach(peer), clock, OverlayNeighbourhood("ring", peer, view, clients=lambda: {"p1"}),
            {"w": torch.zeros(2)}, timeout=5.0,
        )
        for peer, view in [("p0", lambda: server_view), ("p1", lambda: ["p0", "p1"])]
    }

    async def main():
        asyncio.get_running_loop().call_later(2.0, server_view.append, "p1")
        posted = asyncio.ensure_future(exchanges["p0"].step(0, {"w": torch.ones(2)}))
        result = await exchanges["p1"].step(0, {"w": torch.zeros(2)})
        await posted
        return result

    result = run(main())
    assert result.expected == {"p0"} and result.missing == frozenset()
    assert torch.equal(result.state["w"], torch.full((2,), 0.5))
