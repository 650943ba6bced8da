"""The libp2p transport against a hostile sender: every malformed message is refused, counted,
and never reaches the model. Two real p2p daemons on loopback, in this process."""

import asyncio

import hivemind
import pytest
import torch

from gossip.choco import ChocoExchange
from gossip.codecs import parse_codec
from gossip.exchange import MODEL, NeighbourExchange
from gossip.message import Message
from gossip.neighbourhood import GraphNeighbourhood
from gossip.wire import Limits, encode
from peer.net.clock import WallClock
from peer.net.transport import PROTOCOL, P2PTransport
from topology import parse_topology

pytestmark = pytest.mark.network  # every test here talks between two real p2p daemons

REFERENCE = {"x": torch.zeros(4)}


def wire(message: Message) -> bytes:
    return b"".join(bytes(frame) for frame in encode(message))


@pytest.fixture
async def pair():
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [first]
    try:
        dhts.append(
            hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first.get_visible_maddrs())
        )
        victim_p2p, attacker_p2p = [await dht.replicate_p2p() for dht in dhts]
        yield victim_p2p, attacker_p2p
    finally:
        for dht in dhts:
            dht.shutdown()


async def test_malformed_messages_are_rejected_counted_and_never_mixed(pair):
    victim_p2p, attacker_p2p = pair
    victim_id, attacker_id = victim_p2p.peer_id.to_base58(), attacker_p2p.peer_id.to_base58()
    transport = P2PTransport(victim_p2p, Limits(max_payload_bytes=1024))
    ring = GraphNeighbourhood(parse_topology("ring", 2), [victim_id, attacker_id], victim_id)
    exchange = NeighbourExchange(transport, WallClock(), ring, REFERENCE, timeout=1.0)
    await transport.start()

    good = wire(Message(MODEL, attacker_id, 0, {"x": torch.ones(4)}))
    huge = wire(Message(MODEL, attacker_id, 0, {"x": torch.ones(4096)}))
    hostile = {
        "truncated": good[: len(good) - 5],
        "oversized": huge,
        "not msgpack": (8).to_bytes(4, "big") + b"\xc1" * 8,
        "wrong shape": wire(Message(MODEL, attacker_id, 0, {"x": torch.ones(5)})),
        "wrong dtype": wire(Message(MODEL, attacker_id, 0, {"x": torch.ones(4, dtype=torch.float64)})),
        "non-finite": wire(Message(MODEL, attacker_id, 0, {"x": torch.tensor([1.0, float("nan"), 0.0, 0.0])})),
        "spoofed sender": wire(Message(MODEL, victim_id, 0, {"x": torch.ones(4)})),
        "unknown kind": wire(Message("gimme", attacker_id, 0, {"x": torch.ones(4)})),
    }
    for payload in hostile.values():
        _, _, writer = await attacker_p2p.call_binary_stream_handler(victim_p2p.peer_id, PROTOCOL)
        writer.write(payload)
        await writer.drain()
        writer.close()
    for _ in range(100):
        if transport.counters.rejected >= len(hostile):
            break
        await asyncio.sleep(0.05)
    assert transport.counters.rejected == len(hostile)

    own = {"x": torch.full((4,), 2.0)}
    result = await exchange.step(0, own)
    assert result.heard == 0  # nothing hostile reached the mix
    assert torch.equal(result.state["x"], own["x"])
    await transport.stop()


async def test_a_well_formed_model_arrives_and_is_mixed(pair):
    victim_p2p, sender_p2p = pair
    ids = [victim_p2p.peer_id.to_base58(), sender_p2p.peer_id.to_base58()]
    limits = Limits(max_payload_bytes=1024)
    receiver, sender = P2PTransport(victim_p2p, limits), P2PTransport(sender_p2p, limits)
    topology = parse_topology("ring", 2)
    exchanges = [
        NeighbourExchange(t, WallClock(), GraphNeighbourhood(topology, ids, t.peer_id), REFERENCE, timeout=10.0)
        for t in (receiver, sender)
    ]
    await receiver.start()
    await sender.start()
    first, second = await asyncio.gather(
        exchanges[0].step(0, {"x": torch.zeros(4)}), exchanges[1].step(0, {"x": torch.full((4,), 4.0)})
    )
    assert first.heard == 1 and second.heard == 1
    assert torch.equal(first.state["x"], torch.full((4,), 2.0)) and torch.equal(second.state["x"], first.state["x"])
    assert receiver.counters.bytes_received == sender.counters.bytes_sent > 0
    assert receiver.counters.rejected == 0


async def test_compressed_gossip_with_error_feedback_runs_over_p2p(pair):
    first_p2p, second_p2p = pair
    ids = [first_p2p.peer_id.to_base58(), second_p2p.peer_id.to_base58()]
    limits = Limits(max_payload_bytes=1 << 16)
    transports = [P2PTransport(first_p2p, limits), P2PTransport(second_p2p, limits)]
    topology = parse_topology("ring", 2)
    reference = {"x": torch.zeros(1024)}
    exchanges = [
        ChocoExchange(
            t, WallClock(), GraphNeighbourhood(topology, ids, t.peer_id), reference,
            timeout=10.0, codec=parse_codec("topk:0.05+int8"), consensus_step=0.5,
        )
        for t in transports
    ]
    for t in transports:
        await t.start()
    values = [torch.zeros(1024), torch.linspace(0, 4, 1024)]
    for step in range(3):
        results = await asyncio.gather(*(e.step(step, {"x": v}) for e, v in zip(exchanges, values)))
        assert all(r.heard == 1 for r in results)
        values = [r.state["x"] for r in results]
    # Both ends hold the same copy of each link, and the pair terms cancel.
    for me, other in ((0, 1), (1, 0)):
        assert exchanges[me].out_links[ids[other]].version == exchanges[other].in_links[ids[me]].version
        assert torch.equal(exchanges[me].out_links[ids[other]].copy, exchanges[other].in_links[ids[me]].copy)
    torch.testing.assert_close((values[0] + values[1]) / 2, torch.linspace(0, 4, 1024) / 2, atol=1e-5, rtol=0)
    assert all(t.counters.rejected == 0 for t in transports)
    for t in transports:
        await t.stop()
