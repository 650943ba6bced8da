"""The wire format: a length-prefixed msgpack header, then each tensor's raw bytes.

    [header length: 4 bytes, big-endian][msgpack of Message.header()][tensor bytes, in table order]

Tensor bytes are C-contiguous and little-endian. Encoding hands out views of the tensors'
own memory; decoding builds tensors as views into one buffer. Every header field is checked
against ``Limits`` before any payload is read or allocated, so a message that its header
shows to be malformed or too large costs at most one header's worth of memory; and no
payload buffer exists before the payload's first bytes arrive.
"""

from __future__ import annotations

import asyncio
import math
import struct
import sys
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
import torch

from gossip.message import HEADER_LENGTH_PREFIX, WIRE_FORMAT_VERSION, Message, Scalar

if sys.byteorder != "little":
    raise ImportError("the wire carries tensors in native byte order, which must be little-endian")

_PREFIX = struct.Struct(">I")  # HEADER_LENGTH_PREFIX bytes

_HEADER_KEYS = frozenset({"v", "kind", "sender", "round", "codec", "tensors", "meta"})
_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float16, torch.bfloat16, torch.float32, torch.float64,
        torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
    )
}
_TABLE_ENTRY_FIELDS = 4  # [name, dtype, shape, nbytes]
_MAX_DIMS = 8
_MAX_ROUND = 2**62
# Large enough to amortise the per-read overhead; each chunk is a transient copy, so not larger.
_READ_CHUNK = 1 << 20
_WRITE_CHUNK = 1 << 20


class WireError(ValueError):
    """A malformed or oversized message; str() is the reason, for logs and counters."""


class StreamCut(WireError):
    """The stream ended before the message did: its sender stopped writing (it went away, or gave
    up halfway), or its sizes announced more than it sent. The bytes alone do not tell which."""


class StreamEnded(StreamCut):
    """The stream ended before its first byte: no message at all (a sender that gave up)."""


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts. String lengths count UTF-8 bytes."""

    max_payload_bytes: int  # about the size of the model the peer trains, plus slack
    max_header_bytes: int = 1 << 20
    max_tensors: int = 4096
    max_meta_entries: int = 64
    max_string_length: int = 256  # kind, sender, codec, tensor names, meta keys and string values


class _TensorSpec(NamedTuple):
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


class Header(NamedTuple):
    """A parsed and checked header: what the payload that follows must hold."""

    kind: str
    sender: str
    round: int
    codec: str
    tensors: list[_TensorSpec]
    meta: dict[str, Scalar]

    @property
    def payload_size(self) -> int:
        return sum(spec.nbytes for spec in self.tensors)


def encode(message: Message) -> list[memoryview]:
    """Frames to send in order: prefix and header, then one view per tensor.

    Tensor frames share memory with the message's tensors (after a copy only where a tensor
    is non-contiguous or off the CPU), so the tensors must not change until the frames are sent.
    """
    header = msgpack.packb(message.header(), use_bin_type=True)
    frames = [memoryview(_PREFIX.pack(len(header)) + header)]
    for tensor in message.tensors.values():
        # Contiguous on its own device first, so that only the bytes for the wire cross to the CPU.
        host = tensor.detach().contiguous().cpu()
        # A flat, unit-stride view: a contiguous tensor may still carry any stride on size-1 dims,
        # which the byte view refuses. Bytes, because numpy has no bfloat16.
        flat = host.as_strided((host.numel(),), (1,))
        frames.append(memoryview(flat.view(torch.uint8).numpy()))
    return frames


def decode(data: bytes | bytearray | memoryview, limits: Limits) -> Message:
    """Parse one whole message. Its tensors are views into ``data``, which must stay unchanged."""
    view = memoryview(data).cast("B")
    if len(view) < HEADER_LENGTH_PREFIX:
        raise WireError(f"truncated: {len(view)} of {HEADER_LENGTH_PREFIX} length-prefix bytes")
    header_length = _header_length(view[:HEADER_LENGTH_PREFIX], limits)
    payload_start = HEADER_LENGTH_PREFIX + header_length
    if len(view) < payload_start:
        raise WireError(f"truncated: {len(view) - HEADER_LENGTH_PREFIX} of {header_length} header bytes")
    header = _parse_header(view[HEADER_LENGTH_PREFIX:payload_start], limits)
    payload = view[payload_start:]
    if len(payload) < header.payload_size:
        raise WireError(f"truncated: {len(payload)} of {header.payload_size} payload bytes")
    if len(payload) > header.payload_size:
        raise WireError(f"{len(payload) - header.payload_size} trailing bytes after the payload")
    return _message(header, payload)


async def write_message(writer: asyncio.StreamWriter, message: Message) -> int:
    """Send one message and wait for the writer to drain; returns the bytes written."""
    frames = encode(message)
    # Slices with a drain after each keep the transport's buffer small: one large write would be
    # copied whole into it (and copied again as it grows) before the socket takes any of it.
    for frame in frames:
        for offset in range(0, frame.nbytes, _WRITE_CHUNK):
            writer.write(frame[offset : offset + _WRITE_CHUNK])
            await writer.drain()
    return sum(frame.nbytes for frame in frames)


async def read_message(reader: asyncio.StreamReader, limits: Limits) -> Message:
    """Read one message, rejecting it as soon as its header shows it is malformed or too large."""
    return await read_payload(reader, await read_header(reader, limits))


async def read_header(reader: asyncio.StreamReader, limits: Limits) -> Header:
    """Read and check a message's length prefix and header; the payload is still to be read.

    A receiver may decide from the header, before anything is allocated for the payload,
    whether and when to read it (``read_payload``).
    """
    return await read_header_body(reader, await read_header_length(reader, limits), limits)


async def read_header_length(reader: asyncio.StreamReader, limits: Limits) -> int:
    """Read and check the length prefix: what the header will cost a receiver that reads it, so
    that it can make room for it first (``read_header_body``)."""
    try:
        prefix = await reader.readexactly(HEADER_LENGTH_PREFIX)
    except asyncio.IncompleteReadError as error:
        kind = StreamCut if error.partial else StreamEnded
        raise kind(f"truncated: {len(error.partial)} of {HEADER_LENGTH_PREFIX} length-prefix bytes") from None
    return _header_length(prefix, limits)


async def read_header_body(reader: asyncio.StreamReader, length: int, limits: Limits) -> Header:
    """Read and check the header of ``length`` bytes that follows the length prefix."""
    return _parse_header(await _read_exactly(reader, length, "header"), limits)


async def read_payload(reader: asyncio.StreamReader, header: Header) -> Message:
    """Read the payload that ``header`` announced and build the message over it."""
    payload = _PayloadBuffer(header.payload_size)
    # StreamReader.read() returns a new bytes object, which we would then copy again; taking the
    # bytes straight from the reader's own buffer halves the copying of a large model. Those
    # attributes are private, so any other reader falls back to read().
    if all(hasattr(reader, name) for name in ("_buffer", "_wait_for_data", "_maybe_resume_transport")):
        await _fill(reader, payload)
    else:
        await _fill_by_reading(reader, payload)
    return _message(header, payload.memory)


class _PayloadBuffer:
    """A payload's one buffer, allocated when the payload's first bytes arrive.

    A sender that announces a payload and sends none of it costs no buffer. The OS backs a
    large uninitialised buffer page by page as it is written, so the memory a slow sender
    holds follows what it has sent, not what its header claims. A buffer that doubled as the
    bytes came would copy and fault in the payload twice: half the speed of reading a model
    that arrives in pieces (scripts/bench_wire.py).
    """

    def __init__(self, size: int):
        self.size = size
        self.filled = 0
        self.memory = _uninitialised(0)

    @property
    def missing(self) -> int:
        return self.size - self.filled

    def append(self, data: bytes | memoryview) -> None:
        if not self.filled:
            self.memory = _uninitialised(self.size)
        end = self.filled + len(data)
        self.memory[self.filled : end] = data
        self.filled = end


def _uninitialised(size: int) -> memoryview:
    # Unlike a bytearray, whose zero-fill costs a pass over the whole payload; every byte is
    # written before any tensor is built over it, or the message is refused.
    return memoryview(torch.empty(size, dtype=torch.uint8).numpy())


def _header_length(prefix: bytes | memoryview, limits: Limits) -> int:
    (length,) = _PREFIX.unpack(prefix)
    if length > limits.max_header_bytes:
        raise WireError(f"header of {length} bytes exceeds the limit of {limits.max_header_bytes}")
    return length


async def _read_exactly(reader: asyncio.StreamReader, size: int, part: str) -> bytes:
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as error:
        raise StreamCut(f"truncated: {len(error.partial)} of {size} {part} bytes") from None


async def _fill(reader: asyncio.StreamReader, payload: _PayloadBuffer) -> None:
    while payload.missing:
        pending = reader._buffer
        if not pending:
            if reader.at_eof():
                raise StreamCut(f"truncated: {payload.filled} of {payload.size} payload bytes")
            await reader._wait_for_data("read")
            continue
        size = min(len(pending), payload.missing)
        payload.append(memoryview(pending)[:size])
        del pending[:size]
        reader._maybe_resume_transport()


async def _fill_by_reading(reader: asyncio.StreamReader, payload: _PayloadBuffer) -> None:
    while payload.missing:
        chunk = await reader.read(min(payload.missing, _READ_CHUNK))
        if not chunk:
            raise StreamCut(f"truncated: {payload.filled} of {payload.size} payload bytes")
        payload.append(chunk)


def _parse_header(raw: bytes | memoryview, limits: Limits) -> Header:
    try:
        # The unpacker's own limits bound what a hostile header can make it allocate.
        header = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_str_len=limits.max_string_length,
            max_bin_len=0,
            max_ext_len=0,
            max_array_len=max(limits.max_tensors, _MAX_DIMS, _TABLE_ENTRY_FIELDS),
            max_map_len=max(limits.max_meta_entries, len(_HEADER_KEYS)),
        )
    except ValueError as error:
        raise WireError(f"header does not unpack: {str(error) or type(error).__name__}") from None
    if not isinstance(header, dict):
        raise WireError(f"header must be a msgpack map, got {type(header).__name__}")
    if header.keys() != _HEADER_KEYS:
        missing = sorted(_HEADER_KEYS - header.keys())
        unexpected = sorted(map(repr, header.keys() - _HEADER_KEYS))
        raise WireError(f"header keys differ (missing {missing}, unexpected {unexpected})")
    version = header["v"]
    if not _is_int(version) or version != WIRE_FORMAT_VERSION:
        raise WireError(f"wire format version {version!r}, expected {WIRE_FORMAT_VERSION}")
    round_ = header["round"]
    if not _is_int(round_) or not 0 <= round_ < _MAX_ROUND:
        raise WireError(f"round {round_!r} is not an integer in [0, 2**62)")
    parsed = Header(
        kind=_string(header["kind"], "kind"),
        sender=_string(header["sender"], "sender"),
        round=round_,
        codec=_string(header["codec"], "codec"),
        tensors=_tensor_table(header["tensors"], limits),
        meta=_meta(header["meta"], limits),
    )
    if parsed.payload_size > limits.max_payload_bytes:
        raise WireError(f"payload of {parsed.payload_size} bytes exceeds the limit of {limits.max_payload_bytes}")
    return parsed


def _tensor_table(table: Any, limits: Limits) -> list[_TensorSpec]:
    if not isinstance(table, list):
        raise WireError(f"tensors must be a list, got {type(table).__name__}")
    if len(table) > limits.max_tensors:
        raise WireError(f"{len(table)} tensors exceed the limit of {limits.max_tensors}")
    specs, names = [], set()
    for index, entry in enumerate(table):
        if not isinstance(entry, list) or len(entry) != _TABLE_ENTRY_FIELDS:
            raise WireError(f"tensors[{index}] is not a [name, dtype, shape, nbytes] list")
        name, dtype_name, shape, nbytes = entry
        name = _string(name, f"tensors[{index}] name")
        if name in names:
            raise WireError(f"tensor name {name!r} appears twice")
        names.add(name)
        if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
            raise WireError(f"tensor {name!r}: dtype {dtype_name!r} is not allowed")
        dtype = _DTYPES[dtype_name]
        if not isinstance(shape, list) or len(shape) > _MAX_DIMS:
            raise WireError(f"tensor {name!r}: shape is not a list of at most {_MAX_DIMS} sizes")
        if not all(_is_int(size) and size >= 0 for size in shape):
            raise WireError(f"tensor {name!r}: shape {shape!r} has a size that is not a non-negative integer")
        # An empty tensor weighs nothing, but its other sizes still make torch compute strides:
        # counted as if its empty sizes were 1, it must fit the payload limit like any other.
        if 0 in shape and math.prod(max(size, 1) for size in shape) * dtype.itemsize > limits.max_payload_bytes:
            raise WireError(f"tensor {name!r}: shape {shape} is larger than the payload limit of {limits.max_payload_bytes}")
        expected = math.prod(shape) * dtype.itemsize
        if not _is_int(nbytes) or nbytes != expected:
            raise WireError(f"tensor {name!r}: nbytes {nbytes!r} != {expected} for shape {shape} of {dtype_name}")
        specs.append(_TensorSpec(name, dtype, tuple(shape), nbytes))
    return specs


def _meta(meta: Any, limits: Limits) -> dict[str, Scalar]:
    if not isinstance(meta, dict):
        raise WireError(f"meta must be a map, got {type(meta).__name__}")
    if len(meta) > limits.max_meta_entries:
        raise WireError(f"{len(meta)} meta entries exceed the limit of {limits.max_meta_entries}")
    for key, value in meta.items():
        if not isinstance(key, str):
            raise WireError(f"meta key {key!r} is not a string")
        if not isinstance(value, int | float | str):  # bool is an int
            raise WireError(f"meta[{key!r}] must be an int, float, str or bool, got {type(value).__name__}")
    return meta


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise WireError(f"{field} must be a string, got {type(value).__name__}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _message(header: Header, payload: memoryview) -> Message:
    tensors, offset = {}, 0
    with warnings.catch_warnings():
        # Read-only input (bytes) is fine: receivers treat message tensors as read-only.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for spec in header.tensors:
            if spec.nbytes == 0:  # frombuffer refuses empty buffers
                tensor = torch.empty(spec.shape, dtype=spec.dtype)
            else:
                count = spec.nbytes // spec.dtype.itemsize
                tensor = torch.frombuffer(payload, dtype=spec.dtype, count=count, offset=offset).view(spec.shape)
            offset += spec.nbytes
            # Any byte other than 0 or 1 in a bool tensor is undefined behaviour for torch kernels.
            if spec.dtype == torch.bool and bool((tensor.view(torch.uint8) > 1).any()):
                raise WireError(f"tensor {spec.name!r}: bool bytes other than 0 and 1")
            tensors[spec.name] = tensor
    return Message(
        kind=header.kind, sender=header.sender, round=header.round,
        tensors=tensors, meta=header.meta, codec=header.codec,
    )
