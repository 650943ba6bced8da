"""Fuzzing what a stranger can send: thousands of mutated messages (bit flips, truncations,
extensions, header fields of the wrong type or size, other dtypes and shapes, NaN, infinite and
huge values, unknown kinds, spoofed senders), from a seeded generator so that a failure replays.
They go to the wire decoder, through the transport's stream handler into a gossip exchange, and
over real libp2p streams: nothing crashes, nothing is logged as an error, and the model changes
only when a valid model from a neighbour arrived."""

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import random
import struct
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from typing import ClassVar

import hivemind
import msgpack
import pytest
import torch
from hivemind.p2p import PeerID

from gossip.codecs import Identity, parse_codec
from gossip.exchange import MODEL, NeighbourExchange
from gossip.message import Message
from gossip.model_codec import ModelMessages
from gossip.neighbourhood import GraphNeighbourhood
from gossip.protocols import modest, srrw
from gossip.token import Token, token_message
from gossip.transport import PeerUnreachable
from gossip.validation import InvalidState
from gossip.view import View
from gossip.wire import Limits, WireError, decode, encode, read_message
from peer.net.clock import WallClock
from peer.net.stream_limits import StreamLimits
from peer.net.transport import PROTOCOL, P2PTransport
from peer.sim.clock import SimClock
from peer.sim.loop import VirtualTimeLoop
from peer.sim.network import LinkModel, SimNetwork
from tests.sim_swarm import ModestSwarm, Walk, assert_walk_unaffected, evil_member, run
from topology import parse_topology
from topology.walk import VisitCounts

REFERENCE = {"w": torch.zeros(4, 5), "b": torch.zeros(5)}
OWN = {"w": torch.full((4, 5), 0.5), "b": torch.full((5,), -0.5)}
LIMITS = Limits(max_payload_bytes=4096, max_tensors=16, max_meta_entries=8)
STEP = 3
RING = parse_topology("ring", 2)
# Never ignore the sender here: every mutated message must go all the way through the handler.
PATIENT = StreamLimits(strikes=10**9)
DROPPED_BY_DAEMONS = 5  # at most, on a loaded host, of 300 streams closed as soon as written

WEIRD = [
    None, True, False, 0, -1, 1, 7, 255, 2**31 - 1, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**64 - 1, -(2**63),
    0.0, -0.0, 0.5, 1e30, -1e30, math.nan, math.inf, -math.inf, 5e-324,
    "", "model", "gimme", "float32", "float16", "int64", "bool", "complex64", "none", "fp16", "topk:0.25+int8",
    "topk:0+int8", "randk:2", "int8:1", "quant:3", "quant:4:8", "chunktopk:0.25:4:8", "chunktopk:0.5:5",
    "x" * 300, "é" * 100, b"", b"x",
    [], [0], [-1], [20], [5, 4], [2**40, 2**40], [0, 2**62], [2**62, 0, 2**62], [1] * 9, [[1]], {}, {"a": 1}, {1: 2},
]
FLOAT_POISON = [math.nan, math.inf, -math.inf, 1e30, -1e30, 3.4e38, -0.0, 1e-45]


def peer(name: str) -> PeerID:
    return PeerID(hashlib.sha256(name.encode()).digest())


VICTIM, NEIGHBOUR, STRANGER = peer("victim"), peer("neighbour"), peer("stranger")


def wire(message: Message) -> bytes:
    return b"".join(bytes(frame) for frame in encode(message))


def valid_messages(sender: str) -> list[bytes]:
    """Well-formed messages from ``sender``: its model plainly and through every kind of codec,
    then a message of another kind with every other dtype and some metadata."""
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(t.shape, generator=generator) for name, t in REFERENCE.items()}
    messages = [Message(MODEL, sender, STEP, state)]
    for spec in ("fp16", "int8", "topk:0.25+int8", "randk:0.5", "quant:2:8", "chunktopk:0.25:4:8", "topk:0.25+quant:4"):
        tensors, meta, codec = ModelMessages(REFERENCE, parse_codec(spec)).encode(state, seed=7)
        messages.append(Message(MODEL, sender, STEP, tensors, meta, codec))
    others = {
        "i": torch.arange(6, dtype=torch.int64), "m": torch.tensor([True, False]),
        "h": torch.ones(3, dtype=torch.bfloat16), "d": torch.ones(2, dtype=torch.float64),
    }
    messages.append(Message("note", sender, STEP, others, {"lr": 0.1, "steps": 10, "tag": "x", "done": False}))
    return [wire(message) for message in messages]


class Mutator:
    """Seeded mutations of well-formed messages, from a flipped bit to a rewritten header."""

    def __init__(self, seed: int):
        self.random = random.Random(seed)
        self.used: Counter[str] = Counter()

    def __call__(self, data: bytes) -> bytes:
        operator = self.random.choice(self.operators)
        self.used[operator.__name__] += 1
        return operator(self, data)

    @staticmethod
    def split(data: bytes) -> tuple[dict, bytes]:
        (length,) = struct.unpack(">I", data[:4])
        return msgpack.unpackb(data[4 : 4 + length], raw=False, strict_map_key=False), data[4 + length :]

    @staticmethod
    def join(header: object, payload: bytes) -> bytes:
        packed = msgpack.packb(header, use_bin_type=True)
        return struct.pack(">I", len(packed)) + packed + payload

    def weird(self) -> object:
        return self.random.choice(WEIRD)

    # -- bytes ----------------------------------------------------------------------------------

    def flip_bits(self, data: bytes) -> bytes:
        mutated = bytearray(data)
        for _ in range(self.random.randint(1, 8)):
            mutated[self.random.randrange(len(mutated))] ^= 1 << self.random.randrange(8)
        return bytes(mutated)

    def flip_header_bits(self, data: bytes) -> bytes:
        (length,) = struct.unpack(">I", data[:4])
        mutated = bytearray(data)
        for _ in range(self.random.randint(1, 3)):
            mutated[4 + self.random.randrange(length)] ^= 1 << self.random.randrange(8)
        return bytes(mutated)

    def truncate(self, data: bytes) -> bytes:
        return data[: self.random.randrange(len(data))]

    def extend(self, data: bytes) -> bytes:
        return data + self.random.randbytes(self.random.randint(1, 64))

    def insert_or_delete(self, data: bytes) -> bytes:
        at = self.random.randrange(len(data))
        if self.random.random() < 0.5:
            return data[:at] + self.random.randbytes(self.random.randint(1, 4)) + data[at:]
        return data[:at] + data[at + self.random.randint(1, 4) :]

    def length_prefix(self, data: bytes) -> bytes:
        (length,) = struct.unpack(">I", data[:4])
        value = self.random.choice([0, 1, length - 1, length + 1, 2**20, 2**20 + 1, 2**31, 2**32 - 1])
        return struct.pack(">I", max(value, 0)) + data[4:]

    def garbage(self, data: bytes) -> bytes:
        body = self.random.randbytes(self.random.randint(0, 256))
        return struct.pack(">I", len(body)) + body

    def splice(self, data: bytes) -> bytes:
        other = self.random.choice(self.donors)
        return data[: self.random.randrange(len(data))] + other[self.random.randrange(len(other)) :]

    # -- header fields ---------------------------------------------------------------------------

    def header_field(self, data: bytes) -> bytes:
        header, payload = self.split(data)
        key = self.random.choice([*header, "extra"])
        choice = self.random.random()
        if choice < 0.1 and key in header:
            del header[key]
        else:
            header[key] = self.weird()
        return self.join(header, payload)

    def tensor_entry(self, data: bytes) -> bytes:
        header, payload = self.split(data)
        if not header["tensors"]:
            return self.header_field(data)
        entry = self.random.choice(header["tensors"])
        field = self.random.randrange(5)
        if field == 4:  # one size of the shape
            if entry[2]:
                entry[2][self.random.randrange(len(entry[2]))] = self.weird()
        else:
            entry[field] = self.weird()
        return self.join(header, payload)

    def reshaped(self, data: bytes) -> bytes:
        """Another shape or dtype with a matching byte count: well-formed on the wire, a wrong model."""
        header, payload = self.split(data)
        if not header["tensors"]:
            return self.header_field(data)
        entry = self.random.choice(header["tensors"])
        shape, nbytes = entry[2], entry[3]
        if self.random.random() < 0.5:
            entry[2] = [math.prod(shape)] if len(shape) != 1 else [1, *shape]
        else:
            entry[1] = self.random.choice(["float16", "bfloat16", "int16", "uint8", "int8", "int32", "float64", "bool"])
            itemsize = {"float64": 8, "int32": 4, "float16": 2, "bfloat16": 2, "int16": 2}.get(entry[1], 1)
            if nbytes % itemsize == 0:
                entry[2] = [nbytes // itemsize]
            else:
                entry[3] = math.prod(shape) * itemsize  # and the payload no longer fits the table
        return self.join(header, payload)

    def empty_but_huge(self, data: bytes) -> bytes:
        header, payload = self.split(data)
        if not header["tensors"]:
            return self.header_field(data)
        entry = self.random.choice(header["tensors"])
        entry[2] = self.random.choice([[0, 2**40, 2**40], [2**62, 0], [0, 2**20], [0] * 8, [0, 1, 2**31]])
        entry[3] = 0
        return self.join(header, payload)

    def identity(self, data: bytes) -> bytes:
        header, payload = self.split(data)
        field = self.random.choice(["sender", "kind", "round", "codec"])
        header[field] = {
            "sender": lambda: self.random.choice([VICTIM, NEIGHBOUR, STRANGER, peer("other")]).to_base58(),
            "kind": lambda: self.random.choice(["model", "gimme", "note", "", "snapshot", "MODEL"]),
            "round": lambda: self.random.choice([0, STEP - 1, STEP, STEP + 1, STEP + 1000, 2**62 - 1]),
            "codec": lambda: self.random.choice([
                "none", "fp16", "bf16", "int8", "topk:0.25+int8", "randk:0.5", "zip",
                "quant:2:8", "quant:4", "chunktopk:0.25:4:8", "chunktopk:0.5:2:16", "topk:0.25+quant:4",
            ]),
        }[field]()
        return self.join(header, payload)

    def meta(self, data: bytes) -> bytes:
        header, payload = self.split(data)
        key = self.random.choice([*header["meta"], "seed", "lr", "x"])
        header["meta"][key] = self.weird()
        return self.join(header, payload)

    # -- values ----------------------------------------------------------------------------------

    def poison_values(self, data: bytes) -> bytes:
        """NaN, infinities and huge numbers in the tensors' values; the header stays as it was."""
        header, payload = self.split(data)
        mutated = bytearray(payload)
        offset, spots = 0, []
        for _, dtype, _, nbytes in header["tensors"]:
            if dtype in ("float32", "float16", "bfloat16", "float64") and nbytes:
                spots.append((offset, getattr(torch, dtype), nbytes))
            offset += nbytes
        for _ in range(self.random.randint(1, 3) if spots else 0):
            start, dtype, nbytes = self.random.choice(spots)
            values = torch.frombuffer(mutated, dtype=dtype, count=nbytes // dtype.itemsize, offset=start)
            values[self.random.randrange(len(values))] = self.random.choice(FLOAT_POISON)
        return data[: len(data) - len(payload)] + bytes(mutated)

    operators: ClassVar[list[Callable[["Mutator", bytes], bytes]]] = [
        flip_bits, flip_header_bits, truncate, extend, insert_or_delete, length_prefix, garbage, splice,
        header_field, tensor_entry, reshaped, empty_but_huge, identity, meta, poison_values,
    ]
    donors = valid_messages(NEIGHBOUR.to_base58())


def cases(seed: int, count: int, senders: list[PeerID]) -> list[tuple[PeerID, bytes]]:
    """(the peer whose stream carries it, a mutation of one of its own messages); every 50th is one
    of its models unchanged."""
    mutate = Mutator(seed)
    originals = {sender: valid_messages(sender.to_base58()) for sender in senders}
    generated = []
    for index in range(count):
        sender = senders[index % len(senders)]
        if index % 50 == 0:
            generated.append((sender, mutate.random.choice(originals[sender][:-1])))
        else:
            generated.append((sender, mutate(mutate.random.choice(originals[sender]))))
    assert set(mutate.used) == {operator.__name__ for operator in Mutator.operators}
    return generated


def reader_of(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def no_errors_logged(records: list[logging.LogRecord]) -> None:
    errors = [record for record in records if record.levelno >= logging.ERROR or record.exc_info]
    assert not errors, [record.getMessage() for record in errors[:5]]


# -- the decoder ---------------------------------------------------------------------------------


def test_the_decoder_refuses_or_faithfully_decodes_every_mutation(caplog):
    caplog.set_level(logging.WARNING)
    generated = cases(seed=1, count=12_000, senders=[NEIGHBOUR, STRANGER])
    outcomes: Counter[str] = Counter()
    streamed = []
    for index, (_, data) in enumerate(generated):
        try:
            message = decode(data, LIMITS)
        except WireError as reason:
            assert str(reason)
            outcomes["refused"] += 1
            if index % 10 == 0 and "trailing bytes" not in str(reason):  # a stream leaves those unread
                streamed.append((data, str(reason)))
            continue
        outcomes["decoded"] += 1
        # What was accepted is exactly what was sent: it encodes back to the same payload bytes,
        # under a header that decodes to the same fields.
        again = wire(message)
        payload = message.payload_size()
        assert again[len(again) - payload :] == data[len(data) - payload :]
        assert msgpack.packb(decode(again, LIMITS).header()) == msgpack.packb(message.header())
        if index % 10 == 0:
            streamed.append((data, msgpack.packb(message.header())))

    async def read_all() -> None:
        # A stream reader must come to the same verdict as the decoder.
        for data, expected in streamed:
            try:
                outcome = msgpack.packb((await read_message(reader_of(data), LIMITS)).header())
            except WireError as reason:
                outcome = str(reason)
            assert outcome == expected

    asyncio.run(read_all())
    assert outcomes["refused"] > 1000 and outcomes["decoded"] > 1000, outcomes
    no_errors_logged(caplog.records)


# -- the transport's stream handler and the exchange, in memory ----------------------------------


class Nowhere:
    """A stream end whose writes are dropped: the victim's models to its neighbour, its replies."""

    def write(self, data) -> None:
        pass

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


class MemoryP2P:
    """What the transport uses of hivemind's P2P, without a daemon: outgoing streams go nowhere."""

    def __init__(self, peer_id: PeerID):
        self.peer_id = peer_id

    async def call_binary_stream_handler(self, peer_id: PeerID, protocol: str):
        return None, reader_of(b""), Nowhere()


def bits(state: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {name: t.contiguous().view(torch.uint8).numpy().tobytes() for name, t in state.items()}


async def a_valid_model_from_the_neighbour(stream_peer: PeerID, data: bytes) -> bool:
    """What may change the model: read off a stream, a finite model of our layout, for this step
    or a later one, from the neighbour, on the neighbour's own stream."""
    if stream_peer != NEIGHBOUR:
        return False
    try:
        message = await read_message(reader_of(data), LIMITS)
        state = ModelMessages(REFERENCE, Identity()).decode(message.tensors, message.codec, message.meta)
    except (WireError, InvalidState):
        return False
    return (message.sender, message.kind) == (NEIGHBOUR.to_base58(), MODEL) and message.round >= STEP and all(
        bool(torch.isfinite(t).all()) for t in state.values()
    )


async def fuzz_the_exchange(generated: list[tuple[PeerID, bytes]]) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    ids = [VICTIM.to_base58(), NEIGHBOUR.to_base58()]
    for index, (stream_peer, data) in enumerate(generated):
        # A fresh victim for each message, so that none of them can serve a later step.
        transport = P2PTransport(MemoryP2P(VICTIM), LIMITS, stream_limits=PATIENT)
        neighbourhood = GraphNeighbourhood(RING, ids, ids[0])
        exchange = NeighbourExchange(transport, SimClock(), neighbourhood, REFERENCE, timeout=1.0)
        # The handler the daemon calls for each incoming stream, here fed from memory.
        await transport._on_stream(SimpleNamespace(peer_id=stream_peer), reader_of(data), Nowhere())
        result = await exchange.step(STEP, OWN)
        assert all(bool(torch.isfinite(t).all()) for t in result.state.values())
        changed = bits(result.state) != bits(OWN)
        if changed:
            assert result.heard == 1 and await a_valid_model_from_the_neighbour(stream_peer, data), index
            outcomes["mixed"] += 1
        elif result.heard == 0:
            outcomes["unchanged"] += 1
        if index % 50 == 0 and stream_peer == NEIGHBOUR:  # an unmutated model of the neighbour's
            assert changed, index
    return outcomes


def test_mutated_messages_through_the_stream_handler_never_touch_the_model_unless_valid(caplog):
    caplog.set_level(logging.WARNING)
    generated = cases(seed=2, count=3_000, senders=[NEIGHBOUR, STRANGER])
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:  # a timeout costs no wall time
        outcomes = runner.run(fuzz_the_exchange(generated))
    assert outcomes["mixed"] > 30 and outcomes["unchanged"] > 2000, outcomes
    no_errors_logged(caplog.records)


# -- over real libp2p streams --------------------------------------------------------------------


@pytest.mark.network
async def test_mutated_messages_over_real_streams_leave_the_exchange_with_the_honest_neighbour_exact(caplog):
    caplog.set_level(logging.WARNING)
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [first]
    try:
        for _ in range(2):
            dhts.append(
                hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first.get_visible_maddrs())
            )
        victim_p2p, honest_p2p, attacker = [await dht.replicate_p2p() for dht in dhts]
        victim = P2PTransport(victim_p2p, LIMITS, stream_limits=PATIENT)
        honest = P2PTransport(honest_p2p, LIMITS)
        ids = [victim.peer_id, honest.peer_id]
        exchanges = [
            NeighbourExchange(t, WallClock(), GraphNeighbourhood(RING, ids, t.peer_id), REFERENCE, timeout=10.0)
            for t in (victim, honest)
        ]
        for transport in (victim, honest):
            await transport.start()

        # The attacker's own messages and the honest neighbour's, mutated, on the attacker's streams.
        generated = cases(seed=3, count=300, senders=[attacker.peer_id, honest_p2p.peer_id])

        async def send(data: bytes) -> None:
            _, _, writer = await attacker.call_binary_stream_handler(victim_p2p.peer_id, PROTOCOL)
            writer.write(data)
            await writer.drain()
            writer.close()

        for start in range(0, len(generated), 10):
            await asyncio.gather(*(send(data) for _, data in generated[start : start + 10]))
        counters = victim.counters

        def handled() -> int:
            return counters.rejected + counters.messages_received + victim.broken_streams

        for _ in range(600):  # until every stream has been refused, handed to the exchange or seen broken
            if handled() == len(generated):
                break
            await asyncio.sleep(0.05)
        # The attacker closes each stream as soon as it has written: the daemons may drop such a
        # stream before the victim's handler sees it, and then nothing can count it.
        assert len(generated) - DROPPED_BY_DAEMONS <= handled() <= len(generated)
        assert counters.rejections["malformed"] > 0 and counters.rejections["wrong-sender"] > 0

        first_result, second_result = await asyncio.gather(
            exchanges[0].step(STEP, {"w": torch.zeros(4, 5), "b": torch.zeros(5)}),
            exchanges[1].step(STEP, {"w": torch.full((4, 5), 4.0), "b": torch.full((5,), 4.0)}),
        )
        assert first_result.heard == 1 and second_result.heard == 1
        assert bits(first_result.state) == bits({"w": torch.full((4, 5), 2.0), "b": torch.full((5,), 2.0)})
        for transport in (victim, honest):
            await transport.stop()
    finally:
        for dht in dhts:
            dht.shutdown()
    # The p2p client's own task for a stream that the daemons dropped (see above) never ends, and
    # is reported when the test's loop closes: it never reached the victim's code.
    no_errors_logged([record for record in caplog.records if "ControlClient._handler()" not in record.getMessage()])


# -- the message-driven protocols: MoDeST and SRRW -------------------------------------------------

OUTSIDER = "outsider"


async def members_only(peer: str) -> bool:
    return peer != OUTSIDER


class SwarmNetwork(SimNetwork):
    """The simulated world with one peer outside the swarm: every member's transport refuses it."""

    def __init__(self):
        super().__init__(LinkModel(latency=0.01))

    def attach(self, peer_id, admits=members_only):
        return super().attach(peer_id, admits)


def protocol_messages(sender: str, peers: list[str]) -> list[bytes]:
    """Well-formed messages of every MoDeST and SRRW kind from ``sender``."""
    view = View(sender, peers)
    view.touch(sender, 2)
    model = {"x": torch.tensor([10.0], dtype=torch.float64)}
    rows = view.encode()
    token = Token(0, 0, 3, model, VisitCounts.uniform(peers))
    messages = [
        *(Message(kind, sender, 2, rows) for kind in (modest.PING, modest.JOIN, modest.LEAVE, modest.DONE)),
        Message(modest.MODEL, sender, 2, {**rows, **model}),
        Message(modest.TRAINED, sender, 2, {**rows, **model}, {"loss": 0.5, "parent": peers[0]}),
        token_message(srrw.TOKEN, sender, token),
        *(Message(kind, sender, 3, meta={"token": 0, "generation": 0}) for kind in (srrw.REVOKE, srrw.PASSED, srrw.CHECK)),
        Message(srrw.DONE, sender, 24, meta={"token": 0, "generation": 0}),
        Message(srrw.HELLO, sender, 0),
    ]
    return [wire(message) for message in messages]


def protocol_cases(seed: int, count: int, sender: str, peers: list[str]) -> list[Message]:
    """Mutations of ``sender``'s messages that still decode, as a transport would hand them on
    (from the stream's peer: a claimed sender is checked before)."""
    mutate = Mutator(seed)
    originals = protocol_messages(sender, peers)
    limits = Limits(max_payload_bytes=1 << 20, max_tensors=16, max_meta_entries=8)
    decoded = []
    while len(decoded) < count:
        try:
            message = decode(mutate(mutate.random.choice(originals)), limits)
        except WireError:
            continue
        decoded.append(dataclasses.replace(message, sender=sender))
    return decoded


async def fuzz(transport, targets: list[str], messages: list[Message]) -> None:
    """Half as one-way messages, half as requests, spread over the run."""
    for index, message in enumerate(messages):
        target = targets[index % len(targets)]
        if index % 2:
            with contextlib.suppress(TimeoutError, PeerUnreachable):
                await transport.request(target, message, timeout=0.2)
        else:
            await transport.send(target, message)
        await asyncio.sleep(0.01)


def test_mutated_modest_messages_end_no_run_early_and_install_no_absurd_model(caplog):
    caplog.set_level(logging.WARNING)
    rounds = 20
    swarm = ModestSwarm(8, rounds=rounds, network=SwarmNetwork(), sample_size=2)
    honest = list(swarm.ids)
    member = evil_member(swarm, rounds)
    outsider = swarm.network.attach(OUTSIDER)
    as_member = protocol_cases(4, 400, member.me, honest)
    as_outsider = protocol_cases(5, 400, OUTSIDER, honest)

    async def main():
        for peer in honest:
            swarm.start(peer)
        await asyncio.gather(
            fuzz(member.context.transport, honest, as_member), fuzz(outsider, honest, as_outsider),
            *(swarm.tasks[peer] for peer in honest),
        )

    run(main())
    assert swarm.rounds_reported() == list(range(rounds))
    assert all(swarm.protocols[peer].finished.is_set() for peer in honest)
    assert all(abs(swarm.learners[peer].value.item()) < 1e3 for peer in honest)
    counters = [swarm.protocols[peer].context.transport.counters for peer in honest]
    assert sum(c.rejections["not-member"] for c in counters) == len(as_outsider)
    no_errors_logged(caplog.records)


def test_mutated_srrw_messages_stall_no_walk_and_an_outsider_changes_nothing(caplog):
    caplog.set_level(logging.WARNING)
    walk = Walk("ring", 5, rounds=24, seed=0, network=SwarmNetwork())
    outsider = walk.network.attach(OUTSIDER)
    as_outsider = protocol_cases(6, 300, OUTSIDER, walk.ids)
    run(walk.run(fuzz(outsider, walk.ids, as_outsider)))
    assert sum(walk.rejections(peer)["not-member"] for peer in walk.ids) == len(as_outsider)
    assert_walk_unaffected(walk)
    no_errors_logged(caplog.records)

    walk = Walk("ring", 5, rounds=24, seed=0)
    member = walk.network.attach("mallory")
    run(walk.run(fuzz(member, walk.ids, protocol_cases(7, 300, "mallory", walk.ids))))
    assert all(walk.tasks[peer].done() and not walk.tasks[peer].cancelled() for peer in walk.ids)
    assert all(protocol.finished() for protocol in walk.protocols.values())
    assert all(abs(walk.value(peer)) < 1e5 for peer in walk.ids)
    no_errors_logged(caplog.records)
