"""What a stranger's streams may cost a peer: caps on open streams and buffered bytes (a share per
sender), deadlines for the header and the payload, and a peer that keeps sending garbage ignored
for a while. Real p2p daemons on loopback (a victim, attackers and, where needed, an honest
sender), in this process; the accounting itself is tested on its own at the end."""

import asyncio
import contextlib

import pytest
import torch

from gossip.message import HEADER_LENGTH_PREFIX, Message
from gossip.wire import StreamEnded, WireError, read_header_length
from peer.net.stream_limits import ByteBudget, Offenders, StreamLimits
from peer.net.transport import PROTOCOL, P2PTransport
from tests.helpers import LIMITS, MODEL, buffered_size, daemons, eventually, wire

LARGEST_MESSAGE = LIMITS.max_header_bytes + LIMITS.max_payload_bytes  # the unit of the budget of buffered bytes
# Stalled streams hold what they reserved for as long as a test runs.
PATIENT = {"stream_limits": StreamLimits(payload_grace=1000.0), "exchange_timeout": 1000.0}


def header_size(message: Message) -> int:
    return buffered_size(message) - sum(t.nbytes for t in message.tensors.values())


@pytest.fixture
async def trio():
    async with daemons(3) as replicas:
        yield replicas


@pytest.fixture
async def pair():
    async with daemons(2) as replicas:
        yield replicas


class Victim:
    """A transport that keeps every message its handler gets."""

    def __init__(self, p2p, **options):
        self.transport = P2PTransport(p2p, LIMITS, **options)
        self.received: list[Message] = []
        self.transport.serve("model", self._receive)

    async def _receive(self, message: Message) -> None:
        self.received.append(message)

    def rejected(self, reason: str) -> int:
        return self.transport.counters.rejections[reason]


@contextlib.asynccontextmanager
async def victim_on(p2p, **options):
    victim = Victim(p2p, **options)
    await victim.transport.start()
    try:
        yield victim
    finally:
        await victim.transport.stop()


async def open_stream(attacker, victim: Victim, data: bytes = b""):
    _, reader, writer = await attacker.call_binary_stream_handler(victim.transport.p2p.peer_id, PROTOCOL)
    if data:
        with contextlib.suppress(ConnectionError, OSError):  # the victim may have closed it already
            writer.write(data)
            await writer.drain()
    return reader, writer


async def honest_send(p2p, victim: Victim) -> None:
    sender = P2PTransport(p2p, LIMITS)
    await sender.send(victim.transport.peer_id, Message("model", sender.peer_id, 0, {"x": torch.ones(16_384)}))


def stalled(sender_id: str) -> bytes:
    """A valid header announcing the largest payload, then all of the payload but its last byte."""
    return wire(Message("model", sender_id, 0, MODEL))[:-1]


async def stall(attacker, victim: Victim, streams: int):
    """``streams`` stalled streams from ``attacker``, opened a few at a time (its daemon takes only so many at once)."""
    opening = asyncio.Semaphore(20)
    data = stalled(attacker.peer_id.to_base58())

    async def one():
        async with opening:
            return await open_stream(attacker, victim, data)

    return await asyncio.gather(*(one() for _ in range(streams)))


@pytest.mark.network
async def test_slow_streams_from_one_peer_are_capped_and_an_honest_sender_still_gets_through(trio):
    victim_p2p, attacker, honest = trio
    async with victim_on(victim_p2p, **PATIENT) as victim:
        limits = victim.transport.stream_limits
        attacker_id = attacker.peer_id.to_base58()
        streams = await stall(attacker, victim, 200)
        try:
            refused = 200 - limits.max_streams_per_peer
            await eventually(lambda: victim.rejected("over-capacity") + victim.rejected("ignored") == refused)
            assert victim.transport.open_streams.of(attacker_id) == limits.max_streams_per_peer
            # Every admitted stream's header is reserved, but only the payloads its share holds.
            message = Message("model", attacker_id, 0, MODEL)
            held = 2 * buffered_size(message) + (limits.max_streams_per_peer - 2) * header_size(message)
            await eventually(lambda: victim.transport.buffered.held_by(attacker_id) == held)
            assert victim.transport.buffered.share == limits.buffered_messages_per_sender * LARGEST_MESSAGE
            assert victim.transport.buffered.used == victim.transport.buffered.peak == held

            await honest_send(honest, victim)
            await eventually(lambda: len(victim.received) == 1)
            assert victim.received[0].sender == honest.peer_id.to_base58()
            assert victim.transport.open_streams.of(attacker_id) == limits.max_streams_per_peer  # still stalled
        finally:
            for _, writer in streams:
                writer.close()
        # Closed short of their last byte, the stalled payloads are refused and their bytes return to the budget.
        await eventually(lambda: victim.transport.open_streams.total == 0)
        assert victim.transport.buffered.used == 0
        assert victim.rejected("malformed") == limits.max_streams_per_peer


@pytest.mark.network
async def test_an_honest_sender_is_read_at_once_while_three_others_stall_maximal_payloads_on_all_their_streams():
    async with daemons(5) as (victim_p2p, *attackers, honest), victim_on(victim_p2p, **PATIENT) as victim:
        limits = victim.transport.stream_limits
        streams = [stream for attacker in attackers for stream in await stall(attacker, victim, limits.max_streams_per_peer)]
        try:
            # 24 maximal payloads would outgrow the 16 that the whole budget holds; each sender's share holds 2.
            assert len(streams) * LIMITS.max_payload_bytes > victim.transport.buffered.capacity
            message = Message("model", attackers[0].peer_id.to_base58(), 0, MODEL)
            held = 2 * buffered_size(message) + (limits.max_streams_per_peer - 2) * header_size(message)
            await eventually(lambda: all(victim.transport.buffered.held_by(a.peer_id.to_base58()) == held for a in attackers))

            await honest_send(honest, victim)
            await eventually(lambda: len(victim.received) == 1)
            assert victim.received[0].sender == honest.peer_id.to_base58()
            assert victim.transport.open_streams.total == len(streams)  # while every stalled stream still holds its bytes
            assert victim.transport.counters.rejected == 0
        finally:
            for _, writer in streams:
                writer.close()


@pytest.mark.network
async def test_a_header_reserves_its_announced_length_from_its_senders_share_before_it_is_read(pair):
    victim_p2p, attacker = pair
    async with victim_on(victim_p2p, stream_limits=StreamLimits(header_timeout=1000.0)) as victim:
        attacker_id = attacker.peer_id.to_base58()
        _, writer = await open_stream(attacker, victim, LIMITS.max_header_bytes.to_bytes(HEADER_LENGTH_PREFIX, "big"))
        try:
            await eventually(lambda: victim.transport.buffered.held_by(attacker_id) == LIMITS.max_header_bytes)
            assert victim.transport.buffered.used == LIMITS.max_header_bytes
        finally:
            writer.close()
        await eventually(lambda: victim.transport.open_streams.total == 0)
        assert victim.transport.buffered.held_by(attacker_id) == victim.transport.buffered.used == 0
        assert victim.rejected("malformed") == 1  # the header never came


@pytest.mark.network
async def test_a_payload_waits_while_others_hold_the_budget_of_buffered_bytes(trio):
    victim_p2p, attacker, honest = trio
    stream_limits = StreamLimits(buffered_messages=1, buffered_messages_per_sender=1)
    async with victim_on(victim_p2p, stream_limits=stream_limits) as victim:
        attacker_id, honest_id = attacker.peer_id.to_base58(), honest.peer_id.to_base58()
        attack, model = Message("model", attacker_id, 0, MODEL), Message("model", honest_id, 0, MODEL)
        _, writer = await open_stream(attacker, victim, stalled(attacker_id))
        try:
            await eventually(lambda: victim.transport.buffered.used == buffered_size(attack))
            sending = asyncio.ensure_future(honest_send(honest, victim))
            # Admitted, its header read, and waiting: the budget has no room for its payload.
            await eventually(lambda: victim.transport.buffered.held_by(honest_id) == header_size(model))
            await sending
            assert victim.received == [] and victim.transport.buffered.held_by(attacker_id) == buffered_size(attack)
        finally:
            writer.close()
        await eventually(lambda: len(victim.received) == 1)
        assert victim.received[0].sender == honest_id
        assert victim.transport.buffered.peak == buffered_size(attack) + header_size(model)
        assert dict(victim.transport.counters.rejections) == {"malformed": 1}  # the stalled one, cut short


@pytest.mark.network
async def test_a_header_or_payload_that_stops_coming_is_dropped_at_its_deadline(pair):
    victim_p2p, attacker = pair
    # A payload deadline long enough for a header to be read first, much shorter than the default.
    stream_limits = StreamLimits(header_timeout=0.5, payload_grace=1.0, min_payload_rate=1e9)
    async with victim_on(victim_p2p, stream_limits=stream_limits) as victim:
        half_prefix = b"\x00\x00"
        most_of_a_model = wire(Message("model", attacker.peer_id.to_base58(), 0, MODEL))[:-1000]
        streams = [await open_stream(attacker, victim, data) for data in (half_prefix, most_of_a_model)]
        try:
            await eventually(lambda: victim.rejected("too-slow") == 2)
            for reader, _ in streams:
                assert await asyncio.wait_for(reader.read(), timeout=10) == b""  # the victim closed it
            assert victim.transport.open_streams.total == 0 and victim.transport.buffered.used == 0
            assert victim.transport.buffered.peak == buffered_size(Message("model", attacker.peer_id.to_base58(), 0, MODEL))
            assert victim.received == [] and victim.transport.counters.rejected == 2
        finally:
            for _, writer in streams:
                writer.close()


@pytest.mark.network
async def test_a_payload_that_stops_coming_is_dropped_once_the_exchange_would_have_given_up_on_it(pair):
    victim_p2p, attacker = pair
    # Without the exchange timeout, this payload's deadline would be 1000 s.
    async with victim_on(victim_p2p, stream_limits=StreamLimits(payload_grace=1000.0), exchange_timeout=0.5) as victim:
        assert victim.transport.payload_deadline(LIMITS.max_payload_bytes) == 0.5
        _, writer = await open_stream(attacker, victim, stalled(attacker.peer_id.to_base58()))
        try:
            await eventually(lambda: victim.rejected("too-slow") == 1)
            assert victim.transport.open_streams.total == 0 and victim.transport.buffered.used == 0
        finally:
            writer.close()


@pytest.mark.network
async def test_a_garbage_sender_is_ignored_and_an_honest_one_still_gets_through(trio):
    victim_p2p, attacker, honest = trio
    async with victim_on(victim_p2p) as victim:
        attacker_id = attacker.peer_id.to_base58()
        strikes = victim.transport.stream_limits.strikes
        garbage = [
            (8).to_bytes(4, "big") + b"\xc1" * 8,  # not msgpack
            wire(Message("model", honest.peer_id.to_base58(), 0, MODEL)),  # claims another sender
            wire(Message("gimme", attacker_id, 0)),  # a kind nobody serves
        ]
        for index in range(strikes):
            _, writer = await open_stream(attacker, victim, garbage[index % len(garbage)])
            writer.close()
        await eventually(lambda: victim.transport.counters.rejected == strikes)
        assert victim.transport.offenders.ignored(attacker_id)

        # Even a well-formed model from it is now closed unread.
        _, writer = await open_stream(attacker, victim, wire(Message("model", attacker_id, 0, MODEL)))
        writer.close()
        await eventually(lambda: victim.rejected("ignored") == 1)

        await honest_send(honest, victim)
        await eventually(lambda: len(victim.received) == 1)
        assert victim.received[0].sender == honest.peer_id.to_base58()
        assert victim.transport.counters.rejected == strikes + 1


# -- the accounting on its own -------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_offender_is_ignored_for_a_while_then_heard_again():
    clock = FakeClock()
    offenders = Offenders(StreamLimits(strikes=3, strike_window=10, ignore_for=60), clock)
    assert not offenders.strike("a") and not offenders.strike("a")
    clock.now = 11  # the window has passed: the count starts again
    assert not offenders.strike("a") and not offenders.strike("a")
    assert not offenders.ignored("a")
    assert offenders.strike("a")
    assert offenders.ignored("a") and not offenders.ignored("b")
    clock.now = 70
    assert offenders.ignored("a")
    clock.now = 71.5
    assert not offenders.ignored("a")


def test_the_table_of_offenders_is_bounded():
    offenders = Offenders(StreamLimits(strikes=1, max_offenders=3), FakeClock())
    for peer in "abcde":
        offenders.strike(peer)
    assert len(offenders) == 3
    assert [offenders.ignored(peer) for peer in "abcde"] == [False, False, True, True, True]


async def entered(budget: ByteBudget, sender: str, size: int, leave: asyncio.Event) -> asyncio.Event:
    """An event set once ``sender`` has reserved ``size`` bytes, which it holds until ``leave`` is set."""
    inside = asyncio.Event()

    async def hold() -> None:
        async with budget.reserve(sender, size):
            inside.set()
            await leave.wait()

    asyncio.ensure_future(hold())
    for _ in range(10):  # time enough for every reservation that fits to be made
        await asyncio.sleep(0)
    return inside


async def test_a_payload_waits_for_room_in_the_budget():
    budget = ByteBudget(100, share=100)
    leave = asyncio.Event()
    first = await entered(budget, "a", 60, leave)
    second = await entered(budget, "b", 50, asyncio.Event())
    assert first.is_set() and not second.is_set() and budget.used == 60
    leave.set()
    await asyncio.wait_for(second.wait(), timeout=5)
    assert budget.used == 50 and budget.peak == 60
    with pytest.raises(ValueError, match="can never fit"):
        async with budget.reserve("a", 101):
            pass


async def test_an_honest_sender_finds_room_at_once_while_three_senders_hold_their_whole_share():
    limits = StreamLimits()
    budget = ByteBudget(limits.buffered_messages * LARGEST_MESSAGE, share=limits.buffered_messages_per_sender * LARGEST_MESSAGE)
    stalled = asyncio.Event()  # never set: the hostile streams hold their bytes for good
    hostile = [
        await entered(budget, sender, LARGEST_MESSAGE, stalled)
        for sender in ("h1", "h2", "h3") for _ in range(limits.max_streams_per_peer)
    ]
    assert sum(event.is_set() for event in hostile) == 3 * limits.buffered_messages_per_sender  # the rest wait
    assert all(budget.held_by(sender) == budget.share for sender in ("h1", "h2", "h3"))
    assert (await entered(budget, "honest", LARGEST_MESSAGE, stalled)).is_set()


async def test_a_headers_bytes_count_against_its_senders_share():
    budget = ByteBudget(1000, share=100)
    leave = asyncio.Event()
    header = await entered(budget, "a", 40, leave)
    payload = await entered(budget, "a", 70, leave)  # with the header's 40 bytes, past the share
    other = await entered(budget, "b", 70, leave)
    assert header.is_set() and not payload.is_set() and other.is_set()
    assert budget.held_by("a") == 40 and budget.used == 110
    leave.set()
    await asyncio.wait_for(payload.wait(), timeout=5)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_streams": 0}, "max_streams must be > 0"),
        ({"header_timeout": -1.0}, "header_timeout must be > 0"),
        ({"max_streams": 4, "max_streams_per_peer": 8}, "max_streams_per_peer (8) exceeds max_streams (4)"),
        ({"buffered_messages": 1}, "buffered_messages_per_sender (2) exceeds buffered_messages (1)"),
    ],
)
def test_stream_limits_that_make_no_sense_are_refused(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        StreamLimits(**changes)


async def test_a_stream_that_ends_before_its_first_byte_is_told_from_a_truncated_message():
    reader = asyncio.StreamReader()
    reader.feed_eof()
    with pytest.raises(StreamEnded):
        await read_header_length(reader, LIMITS)
    reader = asyncio.StreamReader()
    reader.feed_data(b"\x00")
    reader.feed_eof()
    with pytest.raises(WireError) as refused:  # one byte of a message: a truncated one, refused as before
        await read_header_length(reader, LIMITS)
    assert not isinstance(refused.value, StreamEnded)
