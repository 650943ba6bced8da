"""The wire format: exact round trips, and a precise reason for every message it refuses."""

import ast
import asyncio
import struct
from pathlib import Path

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip import wire
from gossip.message import Message
from gossip.wire import Limits, WireError, decode, encode, read_header, read_message, read_payload, write_message

LIMITS = Limits(max_payload_bytes=1 << 20)
DTYPES = [
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
]


def encoded(message: Message) -> bytes:
    return b"".join(encode(message))


def framed(header: dict, payload: bytes = b"") -> bytes:
    """A message assembled by hand, so that tests can send headers no Message would produce."""
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack(">I", len(packed)) + packed + payload


def filled_reader(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def read(data: bytes, limits: Limits = LIMITS, eof: bool = True) -> Message:
    # A reader that waits for more bytes would hang here, so a timeout means it read too far.
    return await asyncio.wait_for(read_message(filled_reader(data, eof), limits), timeout=5)


class CollectingWriter:
    """Stands in for an asyncio.StreamWriter and keeps what was written."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, frame: memoryview) -> None:
        self.data += frame

    async def drain(self) -> None:
        pass


def bits(tensor: torch.Tensor) -> bytes:
    # A fresh copy has standard strides; .contiguous() may keep an odd stride on a size-1 dim.
    copy = torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor)
    return copy.reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(received: Message, sent: Message) -> None:
    assert (received.kind, received.sender, received.round, received.codec) == (
        sent.kind, sent.sender, sent.round, sent.codec,
    )
    assert received.meta == sent.meta
    assert {k: type(v) for k, v in received.meta.items()} == {k: type(v) for k, v in sent.meta.items()}
    assert list(received.tensors) == list(sent.tensors)
    for name, tensor in sent.tensors.items():
        got = received.tensors[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert bits(got) == bits(tensor), name


def assert_round_trips(message: Message) -> None:
    data = encoded(message)
    assert len(data) == message.wire_size()
    assert_same(decode(data, LIMITS), message)
    assert_same(asyncio.run(read(data)), message)
    writer = CollectingWriter()
    assert asyncio.run(write_message(writer, message)) == message.wire_size()
    assert bytes(writer.data) == data


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=torch.float64).to(dtype)
    return torch.randint(0, 100, shape, dtype=dtype)


# -- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (2, 3, 4)], ids=str)
def test_every_dtype_and_shape_round_trips(dtype, shape):
    assert_round_trips(Message("push", "peer-a", 7, {"t": sample(dtype, shape)}))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_tensors_round_trip_as_their_values(dtype):
    base = sample(dtype, (6, 8))
    tensors = {
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "expanded": base[:1].expand(4, 8),
        # Contiguous by torch's rules, yet with a stride of 2 on a size-1 dimension.
        "single": base[1:2, 3],
        "single_2d": base[2:3, 1::8],
    }
    assert_round_trips(Message("push", "peer-a", 1, tensors))


def test_many_tensors_and_meta_of_every_type_round_trip():
    tensors = {f"layer{i}.weight": sample(DTYPES[i % len(DTYPES)], (i, 3)) for i in range(12)}
    meta = {"loss": 0.25, "steps": 10, "big": 2**64 - 1, "negative": -(2**63), "done": False, "codec_note": "é"}
    assert_round_trips(Message("state", "peer-b", 2**62 - 1, tensors, meta, codec="fp16"))


def test_an_empty_message_round_trips():
    assert_round_trips(Message("ping", "", 0))


def test_tensors_that_need_grad_are_sent_as_their_values():
    weight = torch.randn(3, 3, requires_grad=True)
    received = decode(encoded(Message("push", "a", 0, {"w": weight})), LIMITS)
    assert bits(received.tensors["w"]) == bits(weight.detach())


def test_encode_shares_memory_with_contiguous_tensors():
    tensor = torch.zeros(4, dtype=torch.int32)
    frames = encode(Message("push", "a", 0, {"t": tensor}))
    tensor[0] = 1
    assert bytes(frames[1][:4]) == (1).to_bytes(4, "little")


def test_decoded_tensors_are_views_into_the_received_buffer():
    data = bytearray(encoded(Message("push", "a", 0, {"t": torch.zeros(2, dtype=torch.int32)})))
    received = decode(data, LIMITS)
    data[-4:] = (9).to_bytes(4, "little")
    assert received.tensors["t"].tolist() == [0, 9]


def test_payload_arriving_in_small_pieces_is_reassembled():
    message = Message("push", "a", 3, {"w": torch.randn(1000), "b": torch.arange(10)})
    data = encoded(message)

    async def main():
        reader = asyncio.StreamReader()

        async def trickle():
            for start in range(0, len(data), 333):
                reader.feed_data(data[start : start + 333])
                await asyncio.sleep(0)
            reader.feed_eof()

        feeding = asyncio.create_task(trickle())
        received = await read_message(reader, LIMITS)
        await feeding
        return received

    assert_same(asyncio.run(main()), message)


@pytest.mark.parametrize("public_reader", [False, True], ids=["streamreader", "public-reader"])
def test_no_payload_buffer_exists_until_the_payload_starts_to_arrive(monkeypatch, public_reader):
    allocated = []

    def uninitialised(size):
        allocated.append(size)
        return memoryview(torch.empty(size, dtype=torch.uint8).numpy())

    monkeypatch.setattr(wire, "_uninitialised", uninitialised)
    message = Message("push", "a", 3, {"w": torch.randn(1000)})
    data = encoded(message)
    payload_start = len(data) - message.payload_size()

    async def main():
        reader = asyncio.StreamReader()
        reader.feed_data(data[:payload_start])
        header = await read_header(PublicReader(reader) if public_reader else reader, LIMITS)
        reading = asyncio.ensure_future(read_payload(PublicReader(reader) if public_reader else reader, header))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not reading.done() and not any(allocated)  # a header alone costs no buffer
        reader.feed_data(data[payload_start:])
        reader.feed_eof()
        return await reading

    assert_same(asyncio.run(main()), message)
    assert max(allocated) == message.payload_size()  # then one buffer, the payload's size


class PublicReader:
    """A reader with only StreamReader's public methods, as a future asyncio might offer."""

    def __init__(self, reader: asyncio.StreamReader):
        self._reader = reader

    async def read(self, n: int) -> bytes:
        return await self._reader.read(n)

    async def readexactly(self, n: int) -> bytes:
        return await self._reader.readexactly(n)


@pytest.mark.parametrize("cut", [None, -10])
def test_readers_without_streamreader_internals_work_too(cut):
    message = Message("push", "a", 3, {"w": torch.randn(1000)})
    data = encoded(message)

    async def main():
        return await read_message(PublicReader(filled_reader(data[:cut] if cut else data)), LIMITS)

    if cut:
        with pytest.raises(WireError, match="payload bytes"):
            asyncio.run(main())
    else:
        assert_same(asyncio.run(main()), message)


@st.composite
def tensors(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    strided = draw(st.booleans()) and len(shape) > 0
    # Twice the last dimension when strided, so that every other element can be dropped.
    full_shape = (*shape[:-1], 2 * shape[-1]) if strided else shape
    count = 1
    for size in full_shape:
        count *= size
    raw = bytearray(draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize)))
    if dtype == torch.bool:
        raw = bytearray(byte & 1 for byte in raw)
    tensor = torch.frombuffer(raw, dtype=dtype).reshape(full_shape) if raw else torch.empty(full_shape, dtype=dtype)
    return tensor[..., ::2] if strided else tensor


scalars = st.one_of(
    st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False), st.text(max_size=20), st.booleans(),
)


@given(
    kind=st.text(max_size=20),
    sender=st.text(max_size=20),
    round_=st.integers(0, 2**62 - 1),
    codec=st.text(max_size=20),
    named=st.dictionaries(st.text(max_size=20), tensors(), max_size=4),
    meta=st.dictionaries(st.text(max_size=20), scalars, max_size=5),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_message_round_trips_bit_for_bit(kind, sender, round_, codec, named, meta):
    # Raw random bytes cover NaN payloads, infinities and subnormals in every float format.
    assert_round_trips(Message(kind, sender, round_, named, meta, codec))


# -- rejections ---------------------------------------------------------------------------------


def valid_header(**changes) -> dict:
    header = Message("push", "peer-a", 3, {"w": torch.zeros(2, 3)}, {"lr": 0.1}).header()
    header.update(changes)
    return header


def reason(data: bytes, limits: Limits = LIMITS) -> str:
    """Why both decode and read_message refuse these bytes; they must agree."""
    with pytest.raises(WireError) as from_memory:
        decode(data, limits)
    with pytest.raises(WireError) as from_stream:
        asyncio.run(read(data, limits))
    assert str(from_memory.value) == str(from_stream.value)
    return str(from_memory.value)


def test_a_valid_hand_built_message_is_accepted():
    # Guards the rejection tests below: each one differs from this message in one field only.
    received = decode(framed(valid_header(), bytes(24)), LIMITS)
    assert received.tensors["w"].shape == (2, 3)


@pytest.mark.parametrize("cut", ["prefix", "header", "payload"])
def test_truncation_anywhere_is_rejected(cut):
    data = encoded(Message("push", "a", 0, {"w": torch.randn(10)}))
    header_end = len(data) - 40
    for end in {"prefix": [0, 1, 3], "header": [4, 5, header_end - 1], "payload": [header_end, len(data) - 1]}[cut]:
        assert reason(data[:end]).startswith("truncated"), end


def test_trailing_bytes_are_rejected():
    data = encoded(Message("push", "a", 0, {"w": torch.randn(10)}))
    with pytest.raises(WireError, match="3 trailing bytes"):
        decode(data + b"xyz", LIMITS)


def test_an_oversized_header_is_refused_from_its_length_prefix_alone():
    limits = Limits(max_payload_bytes=100, max_header_bytes=1000)
    prefix = struct.pack(">I", 1001)
    # No EOF and nothing after the prefix: reading on would hang, so an answer proves it stopped.
    with pytest.raises(WireError, match="header of 1001 bytes exceeds the limit of 1000"):
        asyncio.run(read(prefix, limits, eof=False))
    with pytest.raises(WireError, match="header of 1001 bytes exceeds"):
        decode(prefix, limits)


def test_an_oversized_payload_is_refused_before_it_is_read():
    header_only = framed(valid_header(tensors=[["w", "float32", [1000, 1000], 4_000_000]]))
    with pytest.raises(WireError, match="payload of 4000000 bytes exceeds the limit of 1048576"):
        asyncio.run(read(header_only, eof=False))
    with pytest.raises(WireError, match="payload of 4000000 bytes exceeds"):
        decode(header_only, LIMITS)


@pytest.mark.parametrize("shape", [[0, 2**40, 2**40], [0, 2**62], [2**21, 0]])
def test_an_empty_tensor_with_huge_sizes_is_refused_not_built(shape):
    # Zero bytes pass the payload check; building it would overflow torch's stride arithmetic.
    refused = reason(framed(valid_header(tensors=[["w", "float32", shape, 0]])))
    assert refused == f"tensor 'w': shape {shape} is larger than the payload limit of 1048576"


def test_an_empty_tensor_of_plausible_sizes_is_accepted():
    received = decode(framed(valid_header(tensors=[["w", "float32", [0, 16], 0]])), LIMITS)
    assert received.tensors["w"].shape == (0, 16)


def test_many_tensors_summing_past_the_limit_are_refused():
    table = [[f"t{i}", "uint8", [600], 600] for i in range(2)]
    refused = reason(framed(valid_header(tensors=table)), Limits(max_payload_bytes=1000))
    assert refused == "payload of 1200 bytes exceeds the limit of 1000"


@pytest.mark.parametrize(
    ("header_bytes", "expected"),
    [
        (b"", "header does not unpack: Unpack failed: incomplete input"),
        (b"\xc1", "header does not unpack: FormatError"),
        (b"\x01\x02", "header does not unpack: unpack(b) received extra data"),
        (b"\xa2\xff\xfe", "header does not unpack: 'utf-8' codec can't decode"),
        (msgpack.packb([1, 2]), "header must be a msgpack map, got list"),
        (msgpack.packb("push"), "header must be a msgpack map, got str"),
        (msgpack.packb({1: 2}), "header does not unpack: int is not allowed for map key"),
    ],
)
def test_a_header_that_is_not_a_msgpack_map_is_rejected(header_bytes, expected):
    assert reason(struct.pack(">I", len(header_bytes)) + header_bytes).startswith(expected)


def test_missing_and_unexpected_header_keys_are_named():
    header = valid_header(extra=1)
    del header["round"]
    assert reason(framed(header, bytes(24))) == "header keys differ (missing ['round'], unexpected [\"'extra'\"])"


@pytest.mark.parametrize(("version", "shown"), [(2, "2"), (0, "0"), (True, "True"), ("1", "'1'")])
def test_another_wire_format_version_is_rejected(version, shown):
    assert reason(framed(valid_header(v=version), bytes(24))) == f"wire format version {shown}, expected 1"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("kind", 5, "kind must be a string, got int"),
        ("sender", None, "sender must be a string, got NoneType"),
        ("codec", ["none"], "codec must be a string, got list"),
        ("round", -1, "round -1 is not an integer in [0, 2**62)"),
        ("round", 2**62, f"round {2**62} is not an integer in [0, 2**62)"),
        ("round", 1.0, "round 1.0 is not an integer"),
        ("round", True, "round True is not an integer"),
        ("round", "3", "round '3' is not an integer"),
        ("tensors", {"w": 1}, "tensors must be a list, got dict"),
        ("meta", [1], "meta must be a map, got list"),
        ("meta", None, "meta must be a map, got NoneType"),
    ],
)
def test_a_header_field_of_the_wrong_type_is_rejected(field, value, expected):
    assert reason(framed(valid_header(**{field: value}), bytes(24))).startswith(expected)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("w", "tensors[0] is not a [name, dtype, shape, nbytes] list"),
        (["w", "float32", [2, 3]], "tensors[0] is not a [name, dtype, shape, nbytes] list"),
        ([7, "float32", [2, 3], 24], "tensors[0] name must be a string, got int"),
        (["w", "complex64", [2, 3], 24], "tensor 'w': dtype 'complex64' is not allowed"),
        (["w", "torch.float32", [2, 3], 24], "tensor 'w': dtype 'torch.float32' is not allowed"),
        (["w", 6, [2, 3], 24], "tensor 'w': dtype 6 is not allowed"),
        (["w", "float32", "2x3", 24], "tensor 'w': shape is not a list of at most 8 sizes"),
        (["w", "float32", [1] * 9, 4], "tensor 'w': shape is not a list of at most 8 sizes"),
        (["w", "float32", [-2, -3], 24], "tensor 'w': shape [-2, -3] has a size that is not a non-negative integer"),
        (["w", "float32", [2.0, 3], 24], "tensor 'w': shape [2.0, 3] has a size that is not a non-negative integer"),
        (["w", "float32", [True, 6], 24], "tensor 'w': shape [True, 6] has a size that is not a non-negative"),
        (["w", "float32", [2, 3], 23], "tensor 'w': nbytes 23 != 24 for shape [2, 3] of float32"),
        (["w", "float32", [2, 3], 24.0], "tensor 'w': nbytes 24.0 != 24"),
        (["w", "float32", [2, 3], -24], "tensor 'w': nbytes -24 != 24"),
    ],
)
def test_a_malformed_tensor_entry_is_rejected(entry, expected):
    assert reason(framed(valid_header(tensors=[entry]), bytes(24))).startswith(expected)


def test_duplicate_tensor_names_are_rejected():
    table = [["w", "uint8", [2], 2], ["w", "uint8", [2], 2]]
    assert reason(framed(valid_header(tensors=table), bytes(4))) == "tensor name 'w' appears twice"


def test_too_many_tensors_are_rejected():
    table = [[f"t{i}", "uint8", [0], 0] for i in range(3)]
    assert reason(framed(valid_header(tensors=table)), Limits(1000, max_tensors=2)) == "3 tensors exceed the limit of 2"
    # Past the default limit the unpacker itself stops, before building the list.
    table = [[f"t{i}", "uint8", [0], 0] for i in range(4097)]
    assert reason(framed(valid_header(tensors=table))) == "header does not unpack: 4097 exceeds max_array_len(4096)"


@pytest.mark.parametrize(
    "header",
    [
        valid_header(sender="x" * 257),
        valid_header(kind="é" * 129),  # 258 bytes of UTF-8: the limit counts bytes, not characters
        valid_header(codec="x" * 300),
        valid_header(tensors=[["w" * 257, "float32", [2, 3], 24]]),
        valid_header(meta={"k" * 257: 1}),
        valid_header(meta={"note": "v" * 257}),
    ],
)
def test_strings_over_the_length_limit_are_rejected(header):
    assert reason(framed(header, bytes(24))).endswith("exceeds max_str_len(256)")


def test_strings_at_the_length_limit_are_accepted():
    message = Message("k" * 256, "s" * 256, 0, {"n" * 256: torch.ones(1)}, {"m" * 256: "v" * 256}, "c" * 256)
    assert_same(decode(encoded(message), LIMITS), message)


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"a": [1]}, "meta['a'] must be an int, float, str or bool, got list"),
        ({"a": {"b": 1}}, "meta['a'] must be an int, float, str or bool, got dict"),
        ({"a": None}, "meta['a'] must be an int, float, str or bool, got NoneType"),
        ({"a": b""}, "meta['a'] must be an int, float, str or bool, got bytes"),
        ({"a": b"x"}, "header does not unpack: 1 exceeds max_bin_len(0)"),
        ({b"": 1}, "meta key b'' is not a string"),
    ],
)
def test_meta_values_other_than_scalars_are_rejected(meta, expected):
    assert reason(framed(valid_header(meta=meta), bytes(24))) == expected


def test_too_many_meta_entries_are_rejected():
    meta = {f"k{i}": i for i in range(4)}
    assert reason(framed(valid_header(meta=meta), bytes(24)), Limits(1000, max_meta_entries=3)) == (
        "4 meta entries exceed the limit of 3"
    )
    meta = {f"k{i}": i for i in range(65)}
    assert reason(framed(valid_header(meta=meta), bytes(24))) == "header does not unpack: 65 exceeds max_map_len(64)"


def test_bool_tensors_must_hold_only_zero_and_one():
    header = valid_header(tensors=[["mask", "bool", [3], 3]])
    assert reason(framed(header, b"\x00\x01\x02")) == "tensor 'mask': bool bytes other than 0 and 1"


def test_nothing_in_gossip_imports_pickle():
    pickling = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve"}
    for path in Path(__file__).parents[1].joinpath("gossip").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            assert not {module.split(".")[0] for module in modules} & pickling, path
