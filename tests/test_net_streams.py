"""Honest peers on a busy host: a sender keeps within what its receiver admits and never cuts its
own messages short, a receiver makes a member's burst wait instead of striking it, a message cut
short by a sender that went away is a broken stream, and a peer starts training only once it has
reached --min-peers peers. The transports run in this process over Unix socket pairs that stand in
for the p2p daemons (no daemon, no DHT)."""

import asyncio
import socket
from types import SimpleNamespace

import pytest
import torch
from hivemind.p2p import PeerID

from gossip.message import Message
from gossip.wire import Limits, StreamCut, read_message
from peer.errors import ConfigError
from peer.net.node import _wait_for_peers
from peer.net.transport import P2PTransport
from tests.helpers import LIMITS, eventually, wire


class Daemons:
    """Stand-ins for the p2p daemons of a few peers: opening a stream hands one end of a socket pair
    to the other peer's stream handler. A peer marked gone is no longer among the connected peers."""

    def __init__(self) -> None:
        self.nodes: dict[str, FakeP2P] = {}
        self.gone: set[str] = set()

    def node(self, name: str) -> "FakeP2P":
        node = FakeP2P(self, PeerID(b"\x00\x05" + name.encode()))
        self.nodes[node.peer_id.to_base58()] = node
        return node


class FakeP2P:
    def __init__(self, daemons: Daemons, peer_id: PeerID):
        self.daemons = daemons
        self.peer_id = peer_id
        self.handler = None
        self.opened: list[asyncio.StreamWriter] = []  # this side of every stream it opened
        self.serving: set[asyncio.Task] = set()

    async def add_binary_stream_handler(self, protocol, handler) -> None:
        self.handler = handler

    async def remove_binary_stream_handler(self, protocol) -> None:
        self.handler = None

    async def call_binary_stream_handler(self, peer_id: PeerID, protocol):
        other = self.daemons.nodes[peer_id.to_base58()]
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        their_reader, their_writer = await asyncio.open_unix_connection(sock=theirs)
        info = SimpleNamespace(peer_id=self.peer_id)
        task = asyncio.ensure_future(other.handler(info, their_reader, their_writer))
        other.serving.add(task)
        task.add_done_callback(other.serving.discard)
        self.opened.append(writer)
        return info, reader, writer

    async def list_peers(self):
        me = self.peer_id.to_base58()
        return [
            SimpleNamespace(peer_id=node.peer_id)
            for name, node in self.daemons.nodes.items() if name != me and name not in self.daemons.gone
        ]


class Busy:
    """A receiver whose handler does not return until ``release`` is set (an event loop busy with
    training and mixing reads its streams late); it notes how many it held at once."""

    def __init__(self, p2p: FakeP2P):
        self.transport = P2PTransport(p2p, LIMITS)
        self.release = asyncio.Event()
        self.handled: list[int] = []
        self.holding = self.most_held = 0
        self.transport.serve("model", self._receive)

    async def _receive(self, message: Message) -> None:
        self.holding += 1
        self.most_held = max(self.most_held, self.holding)
        await self.release.wait()
        self.holding -= 1
        self.handled.append(message.round)


def model(sender: str, round_: int, size: int = 16) -> Message:
    return Message("model", sender, round_, {"x": torch.ones(size)})


async def test_an_honest_sender_opens_no_more_streams_to_a_busy_receiver_than_it_admits_and_none_is_refused():
    daemons = Daemons()
    receiver = Busy(daemons.node("receiver"))
    sender = P2PTransport(daemons.node("sender"), LIMITS)
    await receiver.transport.start()
    burst = 5 * receiver.transport.stream_limits.max_streams_per_peer  # say, async gossip's models, one a step
    sends = [asyncio.ensure_future(sender.send(receiver.transport.peer_id, model(sender.peer_id, r))) for r in range(burst)]
    cap = sender.stream_limits.streams_to_peer
    await eventually(lambda: receiver.holding == cap)
    assert sender.outgoing(receiver.transport.peer_id) == cap
    assert sum(send.done() for send in sends) == cap  # the others wait for the receiver to close a stream
    receiver.release.set()
    await asyncio.gather(*sends)
    await eventually(lambda: len(receiver.handled) == burst)
    assert sorted(receiver.handled) == list(range(burst))
    assert receiver.most_held <= cap < receiver.transport.stream_limits.max_streams_per_peer
    assert receiver.transport.counters.rejected == 0 and len(receiver.transport.offenders) == 0
    await eventually(lambda: sender.outgoing(receiver.transport.peer_id) == 0)


async def test_a_sender_keeps_its_stream_open_until_the_receiver_has_read_the_message_and_closed_it():
    daemons = Daemons()
    receiver = Busy(daemons.node("receiver"))
    sender_p2p = daemons.node("sender")
    sender = P2PTransport(sender_p2p, LIMITS)
    await receiver.transport.start()
    await sender.send(receiver.transport.peer_id, model(sender.peer_id, 0))
    await eventually(lambda: receiver.holding == 1)  # read, and still in the receiver's hands
    # Closing now could make the daemons drop what the stream still carries.
    assert not sender_p2p.opened[0].is_closing()
    assert sender.outgoing(receiver.transport.peer_id) == 1
    receiver.release.set()
    await eventually(lambda: sender.outgoing(receiver.transport.peer_id) == 0)
    assert sender_p2p.opened[0].is_closing() and receiver.handled == [0]


@pytest.mark.parametrize("asking", [False, True], ids=["send", "request"])
async def test_a_message_whose_sender_stops_waiting_halfway_is_still_written_whole(asking):
    daemons = Daemons()
    receiver_p2p, sender_p2p = daemons.node("receiver"), daemons.node("sender")
    read_it = asyncio.Event()
    received = []

    limits = Limits(max_payload_bytes=1 << 23)

    async def late_reader(info, reader, writer):  # reads only once the sender has given up
        await read_it.wait()
        try:
            received.append(await read_message(reader, limits))
        except StreamCut as cut:
            received.append(cut)
        writer.close()

    receiver_p2p.handler = late_reader
    sender = P2PTransport(sender_p2p, limits)
    big = model(sender.peer_id, 0, size=limits.max_payload_bytes // 4)  # far more than the sockets' buffers hold
    to = receiver_p2p.peer_id.to_base58()
    sending = asyncio.ensure_future(sender.request(to, big, timeout=60) if asking else sender.send(to, big))
    await eventually(lambda: sender_p2p.opened and sender_p2p.opened[0].transport.get_write_buffer_size() > 0)
    sending.cancel()  # the caller's timeout, halfway through the message
    with pytest.raises(asyncio.CancelledError):
        await sending
    read_it.set()
    await eventually(lambda: received)
    assert isinstance(received[0], Message) and torch.equal(received[0].tensors["x"], big.tensors["x"])
    await eventually(lambda: sender.outgoing(receiver_p2p.peer_id.to_base58()) == 0)


async def test_a_peer_that_stops_gives_the_messages_on_their_way_time_to_be_read():
    daemons = Daemons()
    receiver_p2p, sender_p2p = daemons.node("receiver"), daemons.node("sender")
    read_it = asyncio.Event()
    received = []

    async def late_reader(info, reader, writer):  # busy for a moment before it reads
        await read_it.wait()
        received.append(await read_message(reader, LIMITS))
        writer.close()

    receiver_p2p.handler = late_reader
    sender = P2PTransport(sender_p2p, LIMITS)
    await sender.start()
    await sender.send(receiver_p2p.peer_id.to_base58(), model(sender.peer_id, 0))
    stopping = asyncio.ensure_future(sender.stop())  # its daemon goes next, and whatever it still carries
    await eventually(lambda: sender_p2p.handler is None)
    assert not stopping.done()
    read_it.set()
    await stopping
    assert received and received[0].round == 0 and sender.outgoing(receiver_p2p.peer_id.to_base58()) == 0


async def test_a_members_streams_past_its_cap_wait_for_room_instead_of_being_refused():
    daemons = Daemons()
    receiver = Busy(daemons.node("receiver"))
    member = daemons.node("member")  # a burst on streams of its own, without a transport's bound
    await receiver.transport.start()
    cap = receiver.transport.stream_limits.max_streams_per_peer
    burst = cap + 4
    for r in range(burst):
        _, _, writer = await member.call_binary_stream_handler(receiver.transport.p2p.peer_id, None)
        writer.write(wire(model(member.peer_id.to_base58(), r)))
    await eventually(lambda: receiver.holding == cap and receiver.transport._queued[member.peer_id.to_base58()] == 4)
    assert receiver.transport.counters.rejected == 0 and len(receiver.transport.offenders) == 0
    receiver.release.set()
    await eventually(lambda: len(receiver.handled) == burst)
    assert sorted(receiver.handled) == list(range(burst)) and receiver.transport.counters.rejected == 0


async def test_a_message_cut_short_by_a_sender_that_went_away_is_a_broken_stream_not_a_malformed_one():
    daemons = Daemons()
    receiver = Busy(daemons.node("receiver"))
    leaving, staying = daemons.node("leaving"), daemons.node("staying")
    await receiver.transport.start()
    for sender in (leaving, staying):
        _, _, writer = await sender.call_binary_stream_handler(receiver.transport.p2p.peer_id, None)
        data = wire(model(sender.peer_id.to_base58(), 0, size=1000))
        writer.write(data[: len(data) // 2])
        await writer.drain()
        if sender is leaving:
            daemons.gone.add(leaving.peer_id.to_base58())  # it stopped halfway: its connection is gone
        writer.close()
    await eventually(lambda: receiver.transport.broken_streams == 1 and receiver.transport.counters.rejected == 1)
    # The one still connected cut its message short itself, or announced more than it sent.
    assert dict(receiver.transport.counters.rejections) == {"malformed": 1}
    assert not receiver.transport.offenders.ignored(leaving.peer_id.to_base58())
    assert len(receiver.transport.offenders) == 1 and receiver.handled == []


# --- --min-peers counts the peers this one has reached -----------------------------------------


class Records:
    """A membership whose records name ``joined`` (this peer first); ``clients`` accept no streams."""

    def __init__(self, joined: list[str], clients: frozenset[str] = frozenset()):
        self.record = SimpleNamespace(peer_id=joined[0])
        self.live = dict.fromkeys(joined)
        self._clients = set(clients)

    async def announce(self, round_: int) -> None:
        pass

    async def refresh(self) -> None:
        pass

    def joined(self) -> set[str]:
        return set(self.live)

    def clients(self) -> set[str]:
        return set(self._clients)


class Reaching:
    """A transport that reaches the peers in ``answering`` only."""

    def __init__(self, answering: set[str]):
        self.answering = answering
        self.reached: set[str] = set()
        self.asked: list[str] = []

    async def reach(self, peer: str, timeout: float) -> bool:
        self.asked.append(peer)
        if peer in self.answering:
            self.reached.add(peer)
        return peer in self.answering


def settings(min_peers: int, client_mode: bool = False) -> SimpleNamespace:
    return SimpleNamespace(min_peers=min_peers, join_timeout=0.2, swarm="lab", client_mode=client_mode)


async def test_min_peers_counts_the_peers_this_one_has_reached_not_the_records_it_has_read():
    records = Records(["me", "near", "unreachable"])
    with pytest.raises(ConfigError, match=r"only 2 of --min-peers 3 peers .* are reachable .*\(3 joined"):
        await _wait_for_peers(records, settings(3), Reaching({"near"}))
    transport = Reaching({"near", "unreachable"})
    await _wait_for_peers(records, settings(3), transport)
    assert transport.reached == {"near", "unreachable"}


async def test_a_peer_that_reached_us_counts_and_two_peers_in_client_mode_need_not_reach_each_other():
    records = Records(["me", "client", "other-client", "server"], clients=frozenset({"client", "other-client"}))
    transport = Reaching({"server"})
    transport.reached.add("client")  # it opened a stream to us, which we answered
    await _wait_for_peers(records, settings(3), transport)
    assert "client" not in transport.asked and "other-client" not in transport.asked  # nobody dials a client
    with pytest.raises(ConfigError, match="only 3 of --min-peers 4"):
        await _wait_for_peers(records, settings(4), transport)
    # A peer in client mode never neighbours another: it does not wait to reach one.
    await _wait_for_peers(records, settings(4, client_mode=True), transport)
