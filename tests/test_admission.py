"""One admission for every message kind: a transport drops a message from a peer that is not a
member of the swarm before any handler sees it, whatever its kind. In the simulator, and between
real p2p daemons whose membership records live in a real DHT."""

import asyncio

import pytest

from gossip.message import Message
from peer.net.stream_limits import StreamLimits
from peer.net.transport import PROTOCOL, P2PTransport
from peer.sim import SimNetwork
from tests.helpers import LIMITS, eventually, membership, wire
from tests.sim_swarm import run


def members_only(*members: str):
    async def admits(peer: str) -> bool:
        return peer in members

    return admits


def test_a_message_of_a_served_kind_from_a_non_member_is_dropped_before_its_handler_runs():
    network = SimNetwork()
    server = network.attach("server", admits=members_only("member"))
    handled = []

    async def on_leave(message):
        handled.append(message.sender)
        return Message("ack", "server", 0)

    server.serve("modest-leave", on_leave)
    stranger, member = network.attach("stranger"), network.attach("member")

    async def main():
        await stranger.send("server", Message("modest-leave", "stranger", 0))
        with pytest.raises(TimeoutError):
            await stranger.request("server", Message("modest-leave", "stranger", 0), timeout=2)
        return await member.request("server", Message("modest-leave", "member", 0), timeout=2)

    assert run(main()).kind == "ack"
    assert handled == ["member"] and server.counters.rejections == {"not-member": 2}


def test_a_restarted_peer_keeps_its_admission():
    network = SimNetwork()
    admits = members_only()
    network.attach("server", admits=admits)
    network.crash("server")
    assert network.restart("server").admits is admits


@pytest.mark.network
async def test_a_stream_from_a_peer_without_a_membership_record_is_refused_before_its_message_is_read(dhts):
    victim_node, member_node, _, stranger_node = dhts  # the stranger signs its records, but has none in this swarm
    records = membership(victim_node, "admission")
    await membership(member_node, "admission").announce(1)
    victim = P2PTransport(await victim_node[0].replicate_p2p(), LIMITS, admits=records.is_member)
    handled = []

    async def on_leave(message):
        handled.append(message.sender)

    victim.serve("modest-leave", on_leave)
    await victim.start()
    try:
        senders = [P2PTransport(await node[0].replicate_p2p(), LIMITS) for node in (stranger_node, member_node)]
        await asyncio.gather(*(s.send(victim.peer_id, Message("modest-leave", s.peer_id, 3)) for s in senders))
        await eventually(lambda: handled and victim.counters.rejected)
        stranger, member = (s.peer_id for s in senders)
        assert handled == [member] and victim.counters.rejections == {"not-member": 1}
        assert not victim.offenders.ignored(stranger) and len(victim.offenders) == 0  # refused without a strike
    finally:
        await victim.stop()


@pytest.mark.network
async def test_a_burst_from_a_member_we_cannot_place_yet_waits_for_its_record_and_is_served_whole(dhts):
    _, member_node, victim_node, _ = dhts  # a node that has served no stream in this module yet
    victim_p2p, member_p2p = [await node[0].replicate_p2p() for node in (victim_node, member_node)]
    known = asyncio.Event()  # our readings find the member's record only after its burst has begun

    async def admits(peer: str) -> bool:
        return known.is_set()

    victim = P2PTransport(victim_p2p, LIMITS, admits=admits)
    handled = []

    async def on_model(message):
        handled.append(message.round)

    victim.serve("model", on_model)
    await victim.start()
    try:
        # A burst on streams of its own: our transport opens no more than half of what a peer admits at once.
        member_id, burst = member_p2p.peer_id.to_base58(), 3 * victim.stream_limits.max_streams_per_peer
        streams = []
        for r in range(burst):
            _, _, writer = await member_p2p.call_binary_stream_handler(victim_p2p.peer_id, PROTOCOL)
            writer.write(wire(Message("model", member_id, r)))
            await writer.drain()
            streams.append(writer)
        # More of its streams wait than it may have open, and none is refused.
        await eventually(lambda: sum(victim._unverified.values()) > victim.stream_limits.max_streams_per_peer)
        known.set()
        await eventually(lambda: len(handled) == burst)
        assert sorted(handled) == list(range(burst)) and victim.counters.rejected == 0
        for writer in streams:
            writer.close()
    finally:
        await victim.stop()


@pytest.mark.network
async def test_streams_from_a_stranger_wait_apart_and_no_longer_than_a_header_may_take(dhts):
    _, stranger_node, _, victim_node = dhts  # whom the admission below calls a stranger, and a fresh server
    limits = StreamLimits(header_timeout=1.0, max_unverified_per_peer=4)
    victim = P2PTransport(await victim_node[0].replicate_p2p(), LIMITS, admits=members_only(), stream_limits=limits)
    victim.serve("model", lambda message: asyncio.sleep(0))
    await victim.start()
    try:
        stranger = P2PTransport(await stranger_node[0].replicate_p2p(), LIMITS)
        sends = (stranger.send(victim.peer_id, Message("model", stranger.peer_id, r)) for r in range(6))
        await asyncio.gather(*sends, return_exceptions=True)  # those refused at once may break off
        await eventually(lambda: victim.counters.rejections["not-member"] == 6, seconds=10)
        assert victim._unverified == {} and len(victim.offenders) == 0
    finally:
        await victim.stop()
