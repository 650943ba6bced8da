"""Gossip without rounds: the staleness weight, the cache of neighbours' newest models, what is
refused, and sending that never waits."""

from __future__ import annotations

import asyncio

import pytest
import torch

from gossip.message import Message
from gossip.neighbourhood import GraphNeighbourhood
from gossip.transport import PeerUnreachable, TrafficCounters, Transport
from gossip.wait_free import MODEL, SPEED, Staleness, WaitFreeExchange, parse_staleness
from peer.sim import LinkModel, SimClock, SimNetwork, VirtualTimeLoop
from topology import parse_topology

REFERENCE = {"x": torch.zeros(3, dtype=torch.float64)}
IDS = ["a", "b", "c"]
COMPLETE = parse_topology("complete", 3, weights="uniform")  # every weight 1/3


def run(coroutine):
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coroutine)


def state(value: float) -> dict[str, torch.Tensor]:
    return {"x": torch.full((3,), value, dtype=torch.float64)}


def exchanges(staleness: Staleness | None = None, topology=COMPLETE):
    network = SimNetwork(LinkModel(latency=0.01))
    return network, {
        peer: WaitFreeExchange(
            network.attach(peer), SimClock(), GraphNeighbourhood(topology, IDS, peer), REFERENCE,
            timeout=1.0, staleness=staleness or Staleness(),
        )
        for peer in IDS
    }


def test_the_staleness_weight_is_polynomial_and_zero_past_the_bound():
    weight = Staleness(exponent=0.5, bound=3).weight
    assert [weight(tau) for tau in range(5)] == pytest.approx([1, 2**-0.5, 3**-0.5, 0.5, 0])
    assert Staleness(exponent=0.0, bound=10).weight(10) == 1.0
    assert parse_staleness("constant") == 0.0
    assert parse_staleness("poly:1.5") == 1.5
    for bad in ("poly:-1", "poly:x", "poly:nan", "linear", "poly"):
        with pytest.raises(ValueError, match="staleness"):
            parse_staleness(bad)
    with pytest.raises(ValueError, match=">= 0"):
        Staleness(exponent=-0.5)


def test_a_peer_mixes_the_newest_model_of_each_neighbour_weighted_by_its_staleness():
    async def scenario():
        _, peers = exchanges()
        peers["b"].publish(5, state(1.0), speed=None)
        peers["c"].publish(2, state(4.0), speed=None)
        await asyncio.sleep(1)
        first = peers["a"].mix(5, state(0.0))
        # nothing new came: the cached models are mixed again, one iteration staler
        second = peers["a"].mix(6, state(0.0))
        return first, second

    first, second = run(scenario())
    # weights 1/3 (own), 1/3 (b, fresh), 1/3 * (1 + 3)^-0.5 (c, three iterations behind)
    assert first.state["x"] == pytest.approx(torch.full((3,), (1 / 3 + 4 / 6) / (1 / 3 + 1 / 3 + 1 / 6)))
    assert (first.expected, first.heard, first.mixed, first.stalest, first.reached) == (2, 2, 2, 3, 5)
    b, c = 2**-0.5 / 3, 5**-0.5 / 3
    assert second.state["x"] == pytest.approx(torch.full((3,), (b + 4 * c) / (1 / 3 + b + c)))
    assert (second.heard, second.mixed, second.stalest) == (0, 2, 4)


def test_a_model_past_the_bound_is_not_mixed_and_a_slow_peer_moves_on_to_where_its_neighbours_are():
    async def scenario():
        _, peers = exchanges(Staleness(exponent=0.5, bound=32))
        peers["b"].publish(2, state(9.0), speed=None)
        peers["c"].publish(60, state(3.0), speed=None)
        await asyncio.sleep(1)
        ahead = peers["a"].mix(40, state(0.0))
        behind = peers["b"].mix(3, state(9.0))
        return ahead, behind

    ahead, behind = run(scenario())
    assert (ahead.mixed, ahead.stalest) == (1, 0)  # b, 38 iterations behind, is left out
    assert ahead.state["x"] == pytest.approx(torch.full((3,), 1.5))
    assert ahead.reached == 60  # the upper median of b's 2 and c's 60
    assert behind.reached == 60  # b never heard from a: a counts as at b's own iteration, 3


def test_models_that_no_run_could_send_are_refused_and_counted():
    async def scenario():
        network, peers = exchanges()
        a = peers["a"]
        a.set_run_length(100)
        stranger = network.attach("stranger")
        sends = [
            Message(MODEL, "b", 1_000_000, state(1.0)),  # far past the run's last iteration
            Message(MODEL, "b", 7, {"x": torch.full((3,), float("nan"), dtype=torch.float64)}),
            Message(MODEL, "b", 8, state(1.0), meta={SPEED: -3.0}),
            Message(MODEL, "b", 9, state(1.0), meta={SPEED: True}),
            Message(MODEL, "b", 10, {"x": torch.zeros(4, dtype=torch.float64)}),
        ]
        for message in sends:
            await network._endpoints["b"].send("a", message)
        await stranger.send("a", Message(MODEL, "stranger", 3, state(5.0)))
        await asyncio.sleep(1)
        return a, network._endpoints["a"].counters.rejections, a.mix(20, state(0.0))

    _, rejections, result = run(scenario())
    assert rejections == {"malformed": 1, "invalid-model": 4}
    assert (result.heard, result.mixed) == (0, 0)
    assert result.state["x"] == pytest.approx(torch.zeros(3))


def test_an_older_model_that_arrives_late_does_not_replace_a_newer_one():
    async def scenario():
        network, peers = exchanges()
        b = network._endpoints["b"]
        await b.send("a", Message(MODEL, "b", 9, state(9.0), meta={SPEED: 50.0}))
        await b.send("a", Message(MODEL, "b", 4, state(4.0)))
        await asyncio.sleep(1)
        return peers["a"].mix(9, state(0.0))

    result = run(scenario())
    assert result.state["x"] == pytest.approx(torch.full((3,), 4.5))  # (0 + 9) / 2: b's model of iteration 9
    assert result.fastest == 50.0


class SlowLink(Transport):
    """Sends that finish only when the test lets them, or fail for an unreachable peer."""

    def __init__(self, peer_id: str):
        self.peer_id = peer_id
        self.counters = TrafficCounters()
        self.sent: list[tuple[str, int]] = []
        self.release = asyncio.Event()

    async def send(self, peer, message):
        if peer == "c":
            raise PeerUnreachable("c is down")
        await self.release.wait()
        self.sent.append((peer, message.round))

    async def request(self, peer, message, timeout):
        raise NotImplementedError

    def serve(self, kind, handler):
        pass

    def reachable(self):
        return IDS


class Recording(GraphNeighbourhood):
    def __init__(self):
        super().__init__(COMPLETE, IDS, "a")
        self.unreachable_peers: list[str] = []

    def unreachable(self, peer):
        self.unreachable_peers.append(peer)


def test_publishing_never_waits_and_a_slow_link_gets_only_the_newest_model():
    async def scenario():
        transport, neighbourhood = SlowLink("a"), Recording()
        exchange = WaitFreeExchange(
            transport, SimClock(), neighbourhood, REFERENCE, timeout=5.0, staleness=Staleness()
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        for stamp in range(4):
            exchange.publish(stamp, state(stamp), speed=None)
            await asyncio.sleep(0.1)
        published_at = loop.time() - started
        transport.release.set()
        await exchange.flush()
        return transport.sent, neighbourhood.unreachable_peers, published_at

    sent, unreachable, published_at = run(scenario())
    assert published_at == pytest.approx(0.4)  # four sleeps of 0.1 s, no wait on the link
    assert sent == [("b", 0), ("b", 3)]  # the one on the wire, then the newest; 1 and 2 were overtaken
    assert unreachable == ["c"] * 4


def test_a_send_that_hangs_is_given_up_after_the_timeout():
    async def scenario():
        transport, neighbourhood = SlowLink("a"), Recording()
        exchange = WaitFreeExchange(
            transport, SimClock(), neighbourhood, REFERENCE, timeout=5.0, staleness=Staleness()
        )
        exchange.publish(0, state(0.0), speed=None)
        started = asyncio.get_running_loop().time()
        await exchange.flush()
        return asyncio.get_running_loop().time() - started, neighbourhood.unreachable_peers

    waited, unreachable = run(scenario())
    assert waited == pytest.approx(5.0)
    assert sorted(unreachable) == ["b", "c"]
