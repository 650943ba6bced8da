"""D-PSGD and FedAvg on the simulated world, with learners whose result can be predicted exactly."""

import asyncio
import functools

import numpy as np
import pytest
import torch

from gossip.exchange import MODEL
from gossip.message import Message
from gossip.mixing import WeightedAverage
from gossip.neighbourhood import GraphNeighbourhood, OverlayNeighbourhood
from gossip.protocols import DPSGD, FedAvgClient, FedAvgServer, ProtocolContext, RoundReport
from gossip.settings import GossipSettings
from peer.sim import LinkModel, SimClock, SimNetwork
from tests.sim_swarm import build_gossip, run
from tests.vector_learner import VectorLearner
from topology import parse_topology


def build_dpsgd(topology, values, *, timeout=30.0, network=None):
    return build_gossip(topology, values, settings=GossipSettings(timeout=timeout), network=network)


@pytest.mark.parametrize("mix_start", [False, True])
def test_dpsgd_mixes_the_trained_models_or_the_starting_ones_with_the_update_after(mix_start):
    n, rounds = 6, 4
    topology = parse_topology("ring", n)
    x0 = torch.randn(n, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    drift = np.arange(1.0, n + 1)[:, None]  # each peer's training adds its own constant
    _, _, learners, protocols, _ = build_gossip(
        topology, list(x0), protocol=functools.partial(DPSGD, mix_start=mix_start)
    )
    for learner, d in zip(learners, drift[:, 0]):
        learner.drift = float(d)

    async def main():
        await asyncio.gather(*(p.run(rounds) for p in protocols))

    run(main())
    w, expected = topology.mixing_matrix(0), x0.numpy()
    for _ in range(rounds):
        expected = w @ expected + drift if mix_start else w @ (expected + drift)
    np.testing.assert_allclose(np.stack([learner.value.numpy() for learner in learners]), expected, atol=1e-12)


@pytest.mark.parametrize(
    "spec", ["ring", "complete", "star", "exponential", "onepeer-exponential", "base:2", "el-oracle:3", "el-local:3"]
)
def test_dpsgd_rounds_apply_the_mixing_matrices(spec):
    n, rounds = 8, 5
    topology = parse_topology(spec, n, seed=0)
    x0 = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, _, learners, protocols, _ = build_dpsgd(topology, list(x0))

    async def main():
        await asyncio.gather(*(p.run(rounds) for p in protocols))

    run(main())
    expected = x0.numpy()
    for r in range(rounds):
        expected = topology.mixing_matrix(r) @ expected
    got = np.stack([learner.value.numpy() for learner in learners])
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_onepeer_exponential_reaches_the_exact_average_through_the_protocol():
    n = 16
    topology = parse_topology("onepeer-exponential", n)
    x0 = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    _, _, learners, protocols, _ = build_dpsgd(topology, list(x0))

    async def main():
        await asyncio.gather(*(p.run(4) for p in protocols))

    run(main())
    for learner in learners:
        assert learner.value.item() == pytest.approx(x0.mean().item(), abs=1e-12)


def test_a_silent_neighbour_is_left_out_after_the_timeout_and_weights_are_renormalised():
    topology = parse_topology("ring", 4)
    values = [torch.tensor([float(i)]) for i in range(4)]
    network, ids, learners, protocols, reports = build_dpsgd(topology, values, timeout=7.0)
    network.crash("p2")

    async def main():
        await asyncio.gather(*(p.run(1) for i, p in enumerate(protocols) if i != 2))
        return asyncio.get_running_loop().time()

    elapsed = run(main())
    assert elapsed >= 7.0  # p1 and p3 waited for p2 until the timeout
    # p1 mixes itself (1/3) and p0 (1/3); p2's 1/3 is spread over the two that arrived.
    assert learners[1].value.item() == pytest.approx((1.0 + 0.0) / 2)
    assert learners[0].value.item() == pytest.approx((0.0 + 1.0 + 3.0) / 3)
    # The round's exchange lasted the whole timeout; its one local step took no simulated time here.
    assert reports["p1"] == [
        RoundReport(0, 0.0, neighbours_expected=2, neighbours_heard=1, exchange_seconds=7.0, local_steps=1)
    ]
    assert reports["p0"][0].neighbours_heard == 2


def test_lossy_links_never_stall_a_run():
    topology = parse_topology("ring", 6)
    network = SimNetwork(LinkModel(loss=0.3), seed=3)
    values = [torch.tensor([float(i)]) for i in range(6)]
    _, _, learners, protocols, reports = build_dpsgd(topology, values, timeout=2.0, network=network)

    async def main():
        await asyncio.gather(*(p.run(20) for p in protocols))

    run(main())
    assert all(len(r) == 20 for r in reports.values())
    heard = sum(rep.neighbours_heard for r in reports.values() for rep in r)
    assert 0 < heard < 6 * 2 * 20
    # Renormalised mixing keeps every value inside the initial range: nothing shrinks to zero.
    assert all(0.0 <= learner.value.item() <= 5.0 for learner in learners)


def test_invalid_models_are_rejected_and_counted_without_touching_the_mix():
    topology = parse_topology("ring", 3)
    values = [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])]
    network, ids, learners, protocols, _ = build_dpsgd(topology, values)
    attacker = network.attach("mallory")
    bad = [
        {"x": torch.tensor([float("nan"), 0.0], dtype=torch.float64)},
        {"x": torch.zeros(3, dtype=torch.float64)},
        {"x": torch.zeros(2, dtype=torch.float32)},
        {"y": torch.zeros(2, dtype=torch.float64)},
    ]

    async def main():
        for tensors in bad:
            await attacker.send("p0", Message(MODEL, "p1", 0, tensors))  # even posing as a neighbour
        await asyncio.sleep(0.5)
        await asyncio.gather(*(p.run(1) for p in protocols))

    run(main())
    assert network._endpoints["p0"].counters.rejected == len(bad)
    for learner in learners:
        assert torch.equal(learner.value, torch.tensor([1.0, 1.0], dtype=torch.float64))


def test_weighted_average_needs_positive_weights():
    with pytest.raises(ValueError):
        WeightedAverage().mix({"x": torch.ones(1)}, 0.0, [])


def fedavg(n, *, sample_size=None, local_steps=2, network=None):
    """A FedAvg server holding a global vector model of 0, and n clients; returns (network, server, clients, reports)."""
    network = network or SimNetwork()
    clock = SimClock()
    reports = []

    async def finished(report):
        reports.append(report)

    async def noop(report):
        pass

    ids = [f"p{i}" for i in range(n)]
    clients = {
        peer: FedAvgClient(
            ProtocolContext(network.attach(peer), clock, VectorLearner(torch.tensor([100.0]), drift=1.0), None, noop),
            server="server", local_steps=local_steps,
        )
        for peer in ids
    }
    server = FedAvgServer(
        ProtocolContext(network.attach("server"), clock, VectorLearner(torch.zeros(1)), None, finished),
        clients=ids, sample_size=sample_size, local_steps=local_steps, round_timeout=30, seed=0,
    )
    return network, server, clients, reports


def run_fedavg(server, clients, rounds):
    async def main():
        await asyncio.gather(server.run(rounds), *(c.run(rounds) for c in clients.values()))

    run(main())


def test_fedavg_replaces_the_global_model_by_the_average_of_the_trained_ones():
    _, server, clients, reports = fedavg(5)
    run_fedavg(server, clients, 3)
    # Every client trains the global model (+2 per round); their average is the next global model.
    assert server.context.learner.value.item() == pytest.approx(6.0)
    assert [(r.round, r.neighbours_expected, r.neighbours_heard) for r in reports] == [(k, 5, 5) for k in range(3)]
    assert all(c.context.learner.value.item() == pytest.approx(6.0) for c in clients.values())


def test_fedavg_samples_s_clients_a_round_reproducibly():
    _, server, clients, reports = fedavg(6, sample_size=2, local_steps=1)
    samples = [server.sample(k) for k in range(20)]
    assert all(len(s) == 2 for s in samples) and len({tuple(s) for s in samples}) > 5
    run_fedavg(server, clients, 20)
    trained = sum(c.context.learner.steps for c in clients.values())
    assert trained == 40
    assert [server.sample(k) for k in range(20)] == samples


def test_fedavg_keeps_the_global_model_when_no_client_answers():
    network, server, clients, reports = fedavg(3)
    for peer in clients:
        network.crash(peer)
    run(server.run(2))
    assert [r.neighbours_heard for r in reports] == [0, 0]
    assert server.context.learner.value.item() == 0.0


def test_fedavg_stops_sampling_a_client_that_left_and_samples_one_that_joined():
    network, server, clients, _ = fedavg(3, local_steps=1)
    newcomer = FedAvgClient(
        ProtocolContext(network.attach("late"), SimClock(), VectorLearner(torch.zeros(1)), None, None),
        server="server", local_steps=1, joining=True,
    )

    async def main():
        await clients["p0"].leave()
        joined = asyncio.ensure_future(newcomer.run(2))
        await asyncio.sleep(1)
        await asyncio.gather(server.run(2), joined, *(c.run(2) for c in clients.values()))

    run(main())
    assert clients["p0"].context.learner.steps == 0
    assert newcomer.context.learner.steps == 2
    assert server.clients == {"p1", "p2", "late"}


def test_strangers_cannot_crowd_the_neighbours_out_of_the_inbox():
    topology = parse_topology("ring", 4)
    _, ids, _, protocols, _ = build_dpsgd(topology, [torch.zeros(1, dtype=torch.float64) for _ in range(4)])
    exchange = protocols[0].exchange
    model = {"x": torch.ones(1, dtype=torch.float64)}

    async def main():
        for i in range(2000):  # more identities than the inbox has places
            await exchange._receive(Message(MODEL, f"stranger-{i}", 0, model))
        await exchange._receive(Message(MODEL, ids[1], 0, model))

    run(main())
    assert set(exchange._inbox._latest) == {ids[1]}


def test_models_for_steps_past_the_end_of_the_run_are_not_buffered():
    from gossip.exchange import StepInbox

    inbox = StepInbox(end=4)
    assert inbox.put(Message(MODEL, "a", 3))
    assert not inbox.put(Message(MODEL, "a", 4))
    assert not inbox.put(Message(MODEL, "a", -1))


def test_a_neighbour_that_is_ahead_serves_the_current_step_with_its_freshest_model():
    from gossip.exchange import StepInbox

    inbox = StepInbox()
    clock = SimClock()
    assert inbox.put(Message(MODEL, "a", 2))
    assert inbox.put(Message(MODEL, "a", 1))  # accepted but older than what we hold

    async def main():
        got = await inbox.collect(0, {"a"}, clock, timeout=10)
        return got, asyncio.get_running_loop().time()

    got, waited = run(main())
    assert got["a"].round == 2 and waited == 0
    assert not inbox.put(Message(MODEL, "a", 0))  # step 0 is mixed: late


def test_a_slow_peer_skips_ahead_to_its_neighbours_round_instead_of_stalling_them():
    from peer.sim import SpeedProfile

    topology = parse_topology("ring", 4)
    network = SimNetwork(LinkModel(latency=0.01))
    ids = [f"p{i}" for i in range(4)]
    reports = {peer: [] for peer in ids}
    protocols = []
    for i, peer in enumerate(ids):
        clock = SimClock(SpeedProfile(seconds_per_step=2.0 if i == 0 else 0.01))

        async def finished(report, peer=peer):
            reports[peer].append(report)

        context = ProtocolContext(
            network.attach(peer), clock, VectorLearner(torch.tensor([float(i)])),
            GraphNeighbourhood(topology, ids, peer), finished, GossipSettings(timeout=0.5),
        )
        protocols.append(DPSGD(context, local_steps=1))

    async def main():
        await asyncio.gather(*(p.run(30) for p in protocols))

    run(main())
    slow_rounds = [r.round for r in reports["p0"]]
    assert slow_rounds[-1] == 29 and len(slow_rounds) < 30  # it skipped rounds to stay in step
    assert all(len(reports[p]) == 30 for p in ids[1:])
    assert slow_rounds == sorted(set(slow_rounds))


def test_catch_up_pulls_the_most_advanced_valid_snapshot():
    from gossip.catchup import SnapshotServer, catch_up

    network = SimNetwork()
    reference = {"x": torch.zeros(2, dtype=torch.float64)}
    SnapshotServer(network.attach("old"), {"x": torch.ones(2, dtype=torch.float64)}, round_=40)
    SnapshotServer(network.attach("bad"), {"x": torch.ones(3, dtype=torch.float64)}, round_=50)
    network.attach("gone")
    network.crash("gone")
    joiner = network.attach("new")

    async def main():
        return await catch_up(joiner, ["gone", "bad", "old"], reference, timeout=2)

    state, round_ = run(main())
    assert round_ == 40 and torch.equal(state["x"], torch.ones(2, dtype=torch.float64))
    assert run(catch_up(joiner, ["gone"], reference, timeout=2)) is None


def test_a_snapshot_of_absurd_weights_is_refused_as_an_outlier_and_the_next_candidate_is_taken():
    from gossip.catchup import SnapshotServer, catch_up

    network = SimNetwork()
    reference = {"x": torch.zeros(2, dtype=torch.float64)}
    trained = {"x": torch.tensor([0.5, -3.0], dtype=torch.float64)}  # honest, and far from a fresh model
    SnapshotServer(network.attach("absurd"), {"x": torch.full((2,), 1e30, dtype=torch.float64)}, round_=50)
    SnapshotServer(network.attach("honest"), trained, round_=40)
    joiner = network.attach("new")

    state, round_ = run(catch_up(joiner, ["absurd", "honest"], reference, timeout=2))
    assert round_ == 40 and torch.equal(state["x"], trained["x"])
    assert joiner.counters.rejections == {"outlier": 1}


def test_a_pull_from_a_peer_that_is_not_a_member_never_reaches_the_snapshot_server():
    from gossip.catchup import SnapshotServer, catch_up

    network = SimNetwork()
    reference = {"x": torch.zeros(2, dtype=torch.float64)}
    asked = []

    async def members_only(peer):
        asked.append(peer)
        return peer == "member"

    server = network.attach("server", admits=members_only)
    SnapshotServer(server, {"x": torch.ones(2, dtype=torch.float64)}, round_=40)
    stranger, member = network.attach("stranger"), network.attach("member")
    assert run(catch_up(stranger, ["server"], reference, timeout=2)) is None
    assert server.counters.rejections == {"not-member": 1}
    _, round_ = run(catch_up(member, ["server"], reference, timeout=2))
    assert round_ == 40 and asked == ["stranger", "member"]


def test_models_from_senders_that_are_not_admitted_are_rejected():
    network = SimNetwork()
    ids = ["p0", "p1"]
    clock = SimClock()
    transports = [network.attach(peer) for peer in ids]

    async def noop(report):
        pass

    learners = [VectorLearner(torch.tensor([0.0])), VectorLearner(torch.tensor([4.0]))]
    protocols = [
        DPSGD(
            ProtocolContext(
                t, clock, learner,
                OverlayNeighbourhood("ring", t.peer_id, lambda: ids, admits=lambda sender: sender != "p1"),
                noop, GossipSettings(timeout=1.0),
            ),
            local_steps=1,
        )
        for t, learner in zip(transports, learners)
    ]

    async def main():
        await asyncio.gather(*(p.run(1) for p in protocols))

    run(main())
    assert transports[0].counters.rejected == 1  # p0 refuses p1 (say, another model fingerprint)
    assert learners[0].value.item() == 0.0
    assert learners[1].value.item() == 2.0  # p1 admits p0


def test_the_overlay_follows_the_view_and_reports_unreachable_peers():
    view = ["b", "a", "c", "d"]
    dropped = []
    overlay = OverlayNeighbourhood("ring", "a", lambda: view, unreachable=dropped.append)
    assert overlay.out_neighbours(0) == ["b", "d"]  # the sorted view a, b, c, d laid on a ring
    view.remove("d")
    assert sorted(overlay.in_weights(0)) == ["b", "c"]
    view[:] = []
    assert overlay.out_neighbours(0) == [] and overlay.self_weight(0) == 1.0  # alone: keeps its model
    overlay.unreachable("b")
    assert dropped == ["b"]
    assert OverlayNeighbourhood("torus", "a", lambda: ["a", "b", "c"]).out_neighbours(0) == ["b", "c"]  # falls back to a ring


def test_membership_admits_unknown_peers_and_refuses_other_fingerprints():
    from peer.net.membership import Membership, PeerRecord

    membership = Membership(None, "swarm", PeerRecord("me", [], "abc", 0), ttl=10)
    membership.seen = {
        "same": (PeerRecord("same", [], "abc", 3), 100.0),
        "other": (PeerRecord("other", [], "xyz", 3), 100.0),
    }
    assert membership.compatible("same") and membership.compatible("stranger")
    assert not membership.compatible("other")
    membership.live = {"me": membership.record, "same": membership.seen["same"][0]}
    membership.suspect("same")
    assert membership.view() == ["me"]


def test_the_inbox_holds_a_bounded_number_of_senders():
    from gossip.exchange import StepInbox

    inbox = StepInbox(max_senders=2)
    assert inbox.put(Message(MODEL, "a", 0)) and inbox.put(Message(MODEL, "b", 0))
    assert not inbox.put(Message(MODEL, "c", 0))
    assert inbox.put(Message(MODEL, "a", 1))  # a known sender may still update its model
