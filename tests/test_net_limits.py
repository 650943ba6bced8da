"""What a stranger's streams may cost a peer: caps on open streams and buffered bytes, deadlines
for the header and the payload, and a peer that keeps sending garbage ignored for a while. Real
p2p daemons on loopback (a victim, an attacker and, where needed, an honest sender), in this
process; the accounting itself is tested on its own at the end."""

import asyncio
import contextlib

import hivemind
import pytest
import torch

from gossip.message import Message
from gossip.wire import Limits, encode
from peer.net.stream_limits import ByteBudget, Offenders, StreamLimits
from peer.net.transport import PROTOCOL, P2PTransport

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
MODEL = {"x": torch.zeros(16_384)}  # 64 KiB of float32: the largest payload the victim accepts
LIMITS = Limits(max_payload_bytes=1 << 16)


async def eventually(condition, seconds: float = 30.0) -> None:
    """Wait until ``condition()`` holds; the deadline only bounds a failing test."""
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the condition did not come true within the deadline")


def wire(message: Message) -> bytes:
    return b"".join(bytes(frame) for frame in encode(message))


@contextlib.asynccontextmanager
async def daemons(count: int):
    """The p2p of ``count`` fresh peers: the victim's first, then the attacker's and the honest sender's.

    Fresh for each test: a daemon's handler does not survive the replica that registered it
    shutting down, so daemons are not shared between tests."""
    first = hivemind.DHT(start=True, host_maddrs=LOOPBACK)
    started = [first]
    try:
        for _ in range(count - 1):
            started.append(hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=first.get_visible_maddrs()))
        yield [await dht.replicate_p2p() for dht in started]
    finally:
        for dht in started:
            dht.shutdown()


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

    def __init__(self, p2p, stream_limits: StreamLimits | None = None):
        self.transport = P2PTransport(p2p, LIMITS, stream_limits=stream_limits)
        self.received: list[Message] = []
        self.transport.serve("model", self._receive)

    async def _receive(self, message: Message) -> None:
        self.received.append(message)

    def rejected(self, reason: str) -> int:
        return self.transport.counters.rejections[reason]


@contextlib.asynccontextmanager
async def victim_on(p2p, stream_limits: StreamLimits | None = None):
    victim = Victim(p2p, stream_limits)
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


async def test_slow_streams_from_one_peer_are_capped_and_an_honest_sender_still_gets_through(trio):
    victim_p2p, attacker, honest = trio
    async with victim_on(victim_p2p) as victim:
        limits = victim.transport.stream_limits
        attacker_id = attacker.peer_id.to_base58()
        # A valid header announcing the largest payload, a few payload bytes, then nothing more.
        stalled = wire(Message("model", attacker_id, 0, MODEL))[: -(1 << 16) + 100]
        opening = asyncio.Semaphore(20)  # the attacker's own daemon takes only so many opens at once

        async def stall():
            async with opening:
                return await open_stream(attacker, victim, stalled)

        streams = await asyncio.gather(*(stall() for _ in range(200)))
        try:
            refused = 200 - limits.max_streams_per_peer
            await eventually(lambda: victim.rejected("over-capacity") + victim.rejected("ignored") == refused)
            assert victim.transport.open_streams.of(attacker_id) == limits.max_streams_per_peer
            cap = limits.max_streams_per_peer * LIMITS.max_payload_bytes
            assert victim.transport.buffered.used == victim.transport.buffered.peak == cap

            await honest_send(honest, victim)
            await eventually(lambda: len(victim.received) == 1)
            assert victim.received[0].sender == honest.peer_id.to_base58()
            assert victim.transport.open_streams.of(attacker_id) == limits.max_streams_per_peer  # still stalled
        finally:
            for _, writer in streams:
                writer.close()
        # Closed halfway, the stalled payloads are refused and their bytes return to the budget.
        await eventually(lambda: victim.transport.open_streams.total == 0)
        assert victim.transport.buffered.used == 0
        assert victim.rejected("malformed") == limits.max_streams_per_peer


async def test_a_payload_waits_while_others_hold_the_budget_of_buffered_bytes(trio):
    victim_p2p, attacker, honest = trio
    async with victim_on(victim_p2p, StreamLimits(buffered_payloads=1)) as victim:
        stalled = wire(Message("model", attacker.peer_id.to_base58(), 0, MODEL))[:-1000]
        _, writer = await open_stream(attacker, victim, stalled)
        try:
            await eventually(lambda: victim.transport.buffered.used == LIMITS.max_payload_bytes)
            sending = asyncio.ensure_future(honest_send(honest, victim))
            # Admitted, its header read, and waiting: the budget has no room for its payload.
            await eventually(lambda: victim.transport.open_streams.total == 2)
            await sending
            assert victim.received == [] and victim.transport.buffered.used == LIMITS.max_payload_bytes
        finally:
            writer.close()
        await eventually(lambda: len(victim.received) == 1)
        assert victim.received[0].sender == honest.peer_id.to_base58()
        assert victim.transport.buffered.peak == LIMITS.max_payload_bytes
        assert dict(victim.transport.counters.rejections) == {"malformed": 1}  # the stalled one, cut short


async def test_a_header_or_payload_that_stops_coming_is_dropped_at_its_deadline(pair):
    victim_p2p, attacker = pair
    # A payload deadline long enough for a header to be read first, much shorter than the default.
    stream_limits = StreamLimits(header_timeout=0.5, payload_grace=1.0, min_payload_rate=1e9)
    async with victim_on(victim_p2p, stream_limits) as victim:
        half_prefix = b"\x00\x00"
        most_of_a_model = wire(Message("model", attacker.peer_id.to_base58(), 0, MODEL))[:-1000]
        streams = [await open_stream(attacker, victim, data) for data in (half_prefix, most_of_a_model)]
        try:
            await eventually(lambda: victim.rejected("too-slow") == 2)
            for reader, _ in streams:
                assert await asyncio.wait_for(reader.read(), timeout=10) == b""  # the victim closed it
            assert victim.transport.open_streams.total == 0 and victim.transport.buffered.used == 0
            assert victim.transport.buffered.peak == LIMITS.max_payload_bytes
            assert victim.received == [] and victim.transport.counters.rejected == 2
        finally:
            for _, writer in streams:
                writer.close()


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


async def test_a_payload_waits_for_room_in_the_budget():
    budget = ByteBudget(100)
    reserved = asyncio.Event()

    async def second() -> None:
        async with budget.reserve(50):
            reserved.set()

    async with budget.reserve(60):
        waiting = asyncio.ensure_future(second())
        for _ in range(10):
            await asyncio.sleep(0)
        assert not reserved.is_set() and budget.used == 60
    await asyncio.wait_for(waiting, timeout=5)
    assert reserved.is_set() and budget.used == 0 and budget.peak == 60
    with pytest.raises(ValueError, match="can never fit"):
        async with budget.reserve(101):
            pass


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_streams": 0}, "max_streams must be > 0"),
        ({"header_timeout": -1.0}, "header_timeout must be > 0"),
        ({"max_streams": 4, "max_streams_per_peer": 8}, "max_streams_per_peer (8) exceeds max_streams (4)"),
    ],
)
def test_stream_limits_that_make_no_sense_are_refused(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        StreamLimits(**changes)
