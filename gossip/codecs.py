"""Compression codecs for the tensors that peers send: casts, block int8, low-bit quantisation,
top-k (global or per chunk) and random-k.

A codec turns one tensor into named parts for the wire and back. Every part is 1-D and of a
dtype the wire carries. Specs, as they appear in ``Message.codec`` and on the command line:

    none | fp16 | bf16 | int8[:BLOCK] | quant:BITS[:CHUNK] | topk:RATIO | randk:RATIO
    | chunktopk:DENSITY:BITS[:CHUNK] | SPARSIFIER+VALUE

where a composition such as ``topk:0.01+int8`` encodes the kept values with the value codec
(fp16, bf16, int8[:BLOCK] or quant:BITS[:CHUNK]), and BITS is 2, 4 or 8. Part names: ``values``
(all codecs), ``scales`` (int8, quant, chunktopk), ``indices`` (top-k, chunktopk); in a
composition the value codec's parts are prefixed with ``kept.``. quant and chunktopk bit-pack
their codes and indices into uint8 parts (see ``pack_bits``).

Decoding never trusts the sender: every part is checked against the shape and dtype that the
receiver expects before anything is allocated from it or scattered with it.
"""

from __future__ import annotations

import functools
import math
import re
from abc import ABC, abstractmethod
from decimal import Decimal
from fractions import Fraction

import torch

VALID_SPECS = (
    "none, fp16, bf16, int8[:BLOCK] (BLOCK an integer in [8, 65536], default 256), "
    "quant:BITS[:CHUNK] (BITS 2, 4 or 8; CHUNK an integer in [8, 65536], default 256), "
    "topk:RATIO, randk:RATIO (RATIO a number in (0, 1]), "
    "chunktopk:DENSITY:BITS[:CHUNK] (DENSITY in (0, 1], BITS 2, 4 or 8, CHUNK in [8, 65536], default 4096), "
    "or SPARSIFIER+VALUE such as topk:0.01+int8 (VALUE one of fp16, bf16, int8[:BLOCK], quant:BITS[:CHUNK])"
)
DEFAULT_INT8_BLOCK = 256
MIN_INT8_BLOCK, MAX_INT8_BLOCK = 8, 65536
QUANT_WIDTHS = (2, 4, 8)
DEFAULT_QUANT_CHUNK = 256
DEFAULT_CHUNKTOPK_CHUNK = 4096
MAX_PACKED_BITS = 16
INT8_LEVELS = 127  # symmetric: -128 is never produced, so a sign flip cannot overflow
# A bounded exponent keeps parsing an untrusted spec cheap (1e-999999999 would build a huge Fraction).
_RATIO = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d{1,3})?")
_BLOCK = re.compile(r"\d{1,6}")
_KEPT_PREFIX = "kept."
# Entries of the sample that stand for the kept ones: enough that the estimated threshold is rarely far off.
_SAMPLE_TOP = 64


class CodecError(ValueError):
    """A bad codec spec (one line saying what is valid), or a received encoding that is malformed."""


class Codec(ABC):
    """Turns one tensor into named 1-D parts for the wire, and parts back into a tensor."""

    spec: str  # canonical: parse_codec(codec.spec) is an equal codec
    lossless: bool = False
    # Its encodings keep a few entries: a sum of them is no longer one, so a group combines them by
    # gathering every member's encoding rather than by reducing them on the way (an all-reduce).
    sparse: bool = False
    part_names: frozenset[str]

    @abstractmethod
    def encode(self, tensor: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """Parts to put on the wire, computed on the tensor's device. Deterministic for (tensor, seed).

        Parts may share memory with ``tensor``, so it must not change until they are sent.
        """

    @abstractmethod
    def decode(self, parts: dict[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
        """A new tensor of ``shape`` and ``dtype`` on the parts' device; CodecError if the parts are malformed."""


class Identity(Codec):
    """The tensor as it is, in any dtype."""

    spec = "none"
    lossless = True
    part_names = frozenset({"values"})

    def encode(self, tensor: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        return {"values": tensor.detach().reshape(-1)}

    def decode(self, parts: dict[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
        _check_names(self.spec, parts, self.part_names)
        values = _checked_part(self.spec, parts, "values", dtype, math.prod(shape))
        # A copy: received parts are views of a read-only buffer, and the caller owns the result.
        return values.clone().reshape(shape)


class Cast(Codec):
    """Values cast to a 16-bit float. fp16 overflows to infinity beyond 65504; bf16 keeps float32's range."""

    part_names = frozenset({"values"})

    def __init__(self, spec: str, wire_dtype: torch.dtype) -> None:
        self.spec = spec
        self.wire_dtype = wire_dtype

    def encode(self, tensor: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        return {"values": _floating_flat(self.spec, tensor).to(self.wire_dtype)}

    def decode(self, parts: dict[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
        _require_floating(self.spec, dtype)
        _check_names(self.spec, parts, self.part_names)
        values = _checked_part(self.spec, parts, "values", self.wire_dtype, math.prod(shape))
        return values.to(dtype, copy=True).reshape(shape)


class BlockInt8(Codec):
    """Symmetric int8 with one float32 scale, max|x| / 127, per block of the flattened tensor.

    Each element decodes to within scale / 2 of its value (plus float rounding). Scales are
    float32, not float16, because float16 would overflow for blocks beyond 65504 * 127 and
    flush the small scales of gradients to zero, breaking that bound. An all-zero block has
    scale 0 and decodes to exact zeros. A block holding NaN or infinity gets a non-finite
    scale, which decoders refuse: such a tensor cannot be sent with this codec.
    """

    part_names = frozenset({"values", "scales"})

    def __init__(self, block: int = DEFAULT_INT8_BLOCK) -> None:
        if not MIN_INT8_BLOCK <= block <= MAX_INT8_BLOCK:
            raise CodecError(f"int8 block {block} is outside [{MIN_INT8_BLOCK}, {MAX_INT8_BLOCK}]")
        self.block = block
        self.spec = "int8" if block == DEFAULT_INT8_BLOCK else f"int8:{block}"

    def encode(self, tensor: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        flat = _floating_flat(self.spec, tensor).to(torch.float32)
        values = torch.empty(flat.numel(), dtype=torch.int8, device=flat.device)
        scales = torch.empty(self._block_count(flat.numel()), dtype=torch.float32, device=flat.device)
        for rows, quantised, row_scales in zip(self._rows(flat), self._rows(values), self._split(scales, flat.numel())):
            torch.div(torch.linalg.vector_norm(rows, ord=math.inf, dim=1), INT8_LEVELS, out=row_scales)
            # Zero blocks, and scales that underflow to zero, divide by 1 so that they round to 0, not NaN.
            divisors = torch.where(row_scales > 0, row_scales, 1.0)
            # Clamped because a subnormal scale is too coarse to keep |x| / scale within 127.
            quantised.copy_((rows / divisors[:, None]).round_().clamp_(-INT8_LEVELS, INT8_LEVELS))
        return {"values": values, "scales": scales}

    def decode(self, parts: dict[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
        _require_floating(self.spec, dtype)
        _check_names(self.spec, parts, self.part_names)
        numel = math.prod(shape)
        values = _checked_part(self.spec, parts, "values", torch.int8, numel)
        scales = _checked_scales(self.spec, parts, self._block_count(numel))
        if bool((values < -INT8_LEVELS).any()):
            raise CodecError(f"{self.spec}: values must lie in [-{INT8_LEVELS}, {INT8_LEVELS}]")
        decoded = torch.empty(numel, dtype=torch.float32, device=values.device)
        for quantised, row_scales, rows in zip(self._rows(values), self._split(scales, numel), self._rows(decoded)):
            torch.mul(quantised, row_scales[:, None], out=rows)
        return decoded.to(dtype).reshape(shape)

    def _block_count(self, numel: int) -> int:
        return -(-numel // self.block)

    def _rows(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return _chunk_rows(flat, self.block)

    def _split(self, scales: torch.Tensor, numel: int) -> list[torch.Tensor]:
        return _split_like_rows(scales, numel, self.block)


class Quant(Codec):
    """BITS-bit codes with one float32 scale, max|x|, per chunk of the flattened tensor.

    The quantiser is mid-rise uniform over [-scale, scale] with L = 2**BITS levels and no zero
    level: x gets code q = clamp(floor((x / scale + 1) * L / 2), 0, L - 1) and decodes to
    scale * ((2q + 1) / L - 1), the middle of its cell. So each value decodes to within
    scale / L of its value (plus float rounding), and zero decodes to +-scale / L unless its
    whole chunk is zero: a chunk of scale 0 decodes to exact zeros. Codes are bit-packed (see
    ``pack_bits``), BITS / 8 bytes a value. As with int8, a chunk holding NaN or infinity gets
    a non-finite scale, which decoders refuse.
    """

    part_names = frozenset({"values", "scales"})

    def __init__(self, bits: int, chunk: int = DEFAULT_QUANT_CHUNK) -> None:
        _check_width("quant", bits)
        _check_chunk("quant", chunk)
        self.bits, self.chunk = bits, chunk
        self.spec = f"quant:{bits}" + ("" if chunk == DEFAULT_QUANT_CHUNK else f":{chunk}")

    def encode(self, tensor: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        flat = _floating_flat(self.spec, tensor).to(torch.float32)
        codes = torch.empty(flat.numel(), dtype=torch.uint8, device=flat.device)
        scales = torch.empty(-(-flat.numel() // self.chunk), dtype=torch.float32, device=flat.device)
        for rows, row_codes, row_scales in zip(self._rows(flat), self._rows(codes), self._split(scales, flat.numel())):
            torch.linalg.vector_norm(rows, ord=math.inf, dim=1, out=row_scales)
            row_codes.copy_(_quantise(rows, row_scales, self.bits))
        return {"values": pack_bits(codes, self.bits), "scales": scales}

    def decode(self, parts: dict[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
        _require_floating(self.spec, dtype)
        _check_names(self.spec, parts, self.part_names)
        numel = math.prod(shape)
        codes = _checked_codes(self.spec, parts, "values", self.bits, numel)
        scales = _checked_scales(self.spec, parts, -(-numel // self.chunk))
        decoded = torch.empty(numel, dtype=torch.float32, device=codes.device)
        for row_codes, row_scales, rows in zip(self._rows(codes), self._split(scales, numel), self._rows(decoded)):
            _dequantise(row_codes, row_scales, self.bits, out=rows)
        return decoded.to(dtype).reshape(shape)

    def _rows(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return _chunk_rows(flat, self.chunk)

    def _split(self, scales: torch.Tensor, numel: int) -> list[torch.Tensor]:
        return _split_like_rows(scales, numel, self.chunk)


class Sparsifier(Codec):
    """Keeps k = max(1, ceil(ratio * numel)) entries (none of an empty tensor) and zeros the rest.

    Kept values travel in the tensor's dtype, or through a value codec when composed.
    """

    name: str
    sparse = True

    def __init__(self, ratio_text: str, values: Codec | None = None) -> None:
        self.ratio, self.ratio_text = _exact_ratio(f"{self.name} RATIO", ratio_text)
        self.value_codec = values or Identity()
        self.value_prefix = "" if values is None else _KEPT_PREFIX
        self.spec = f"{self.name}:{self.ratio_text}" + ("" if values is None else f"+{values.spec}")
        self.part_names = self._own_parts() | {self.value_prefix + name for name in self.value_codec.part_names}

    def kept(self, numel: int) -> int:
        return 0 if numel == 0 else max(1, math.ceil(self.ratio * numel))

    def encode(self, tensor: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        flat = _floating_flat(self.spec, tensor)
        indices = self._choose(flat, self.kept(flat.numel()), seed)
        value_parts = self.value_codec.encode(flat[indices], seed)
        own = self._own_encoding(indices.to(_index_dtype(flat.numel())))
        return own | {self.value_prefix + name: part for name, part in value_parts.items()}

    def decode(self, parts: dict[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
        _require_floating(self.spec, dtype)
        _check_names(self.spec, parts, self.part_names)
        numel = math.prod(shape)
        kept = self.kept(numel)
        value_parts = {name.removeprefix(self.value_prefix): parts[name] for name in parts if name not in self._own_parts()}
        try:
            values = self.value_codec.decode(value_parts, torch.Size([kept]), dtype, seed)
        except CodecError as error:
            raise CodecError(f"{self.spec}: kept values: {error}") from None
        indices = self._received_indices(parts, numel, kept, seed).to(values.device)
        decoded = torch.zeros(numel, dtype=dtype, device=values.device)
        decoded[indices] = values
        return decoded.reshape(shape)

    @abstractmethod
    def _own_parts(self) -> frozenset[str]: ...

    @abstractmethod
    def _choose(self, flat: torch.Tensor, kept: int, seed: int) -> torch.Tensor:
        """Sorted int64 indices of the entries to keep, on the tensor's device."""

    @abstractmethod
    def _own_encoding(self, indices: torch.Tensor) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def _received_indices(self, parts: dict[str, torch.Tensor], numel: int, kept: int, seed: int) -> torch.Tensor:
        """The indices that the values belong to, validated."""


class TopK(Sparsifier):
    """The k entries of largest magnitude; among equal magnitudes, the lowest indices. NaN counts as largest.

    Indices travel sorted (strictly increasing), so a receiver checks uniqueness in one pass.
    """

    name = "topk"

    def _own_parts(self) -> frozenset[str]:
        return frozenset({"indices"})

    def _choose(self, flat: torch.Tensor, kept: int, seed: int) -> torch.Tensor:
        if kept == flat.numel():
            return torch.arange(kept, device=flat.device)
        magnitude = flat.abs()
        torch.nan_to_num(magnitude, nan=math.inf, out=magnitude)
        candidates = _likely_top(magnitude, kept)
        among = magnitude[candidates]
        top = among.topk(kept, sorted=False)
        threshold = top.values.min()
        # topk breaks ties at the threshold in no specified order; only when some tied entry was
        # left out does the choice matter, and then the lowest indices are taken.
        if int((top.values == threshold).sum()) == int((among == threshold).sum()):
            return candidates[top.indices].sort().values
        above = candidates[among > threshold]
        tied = candidates[among == threshold][: kept - above.numel()]
        return torch.cat([above, tied]).sort().values

    def _own_encoding(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"indices": indices}

    def _received_indices(self, parts: dict[str, torch.Tensor], numel: int, kept: int, seed: int) -> torch.Tensor:
        indices = _checked_part(self.spec, parts, "indices", _index_dtype(numel), kept)
        if kept == 0:
            return indices.long()
        lowest, highest = torch.aminmax(indices)
        if int(lowest) < 0 or int(highest) >= numel:
            raise CodecError(f"{self.spec}: indices [{int(lowest)}, {int(highest)}] are outside [0, {numel})")
        if not bool((indices[1:] > indices[:-1]).all()):
            raise CodecError(f"{self.spec}: indices must be strictly increasing (unique and sorted)")
        return indices.long()


class RandK(Sparsifier):
    """k entries chosen at random by a generator seeded with ``seed``; only the values travel.

    The receiver draws the same indices from the same seed, so both sides must agree on the seed
    and run the same torch version. Values are not scaled by numel / k: making the estimate
    unbiased is a policy for error feedback, not for the codec. Callers should vary the seed per
    tensor and per round, or the same entries are sent every time.
    """

    name = "randk"

    def _own_parts(self) -> frozenset[str]:
        return frozenset()

    def _choose(self, flat: torch.Tensor, kept: int, seed: int) -> torch.Tensor:
        return _random_subset(flat.numel(), kept, seed).to(flat.device)

    def _own_encoding(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def _received_indices(self, parts: dict[str, torch.Tensor], numel: int, kept: int, seed: int) -> torch.Tensor:
        return _random_subset(numel, kept, seed)


class ChunkTopK(Codec):
    """Per chunk of CHUNK entries (the last may be short), the k = max(1, ceil(DENSITY * length))
    of largest magnitude, their values quantised as in ``Quant`` with one float32 scale per chunk.

    Ties go to the lowest index and NaN counts as largest, as in ``TopK``. An index is the
    position within its chunk, ceil(log2(CHUNK)) bits, and travels bit-packed with the chunk's
    indices strictly increasing; values are BITS-bit codes. A kept value decodes to within
    scale / 2**BITS of its value, where the scale is the chunk's max|x|; the rest decode to zero.
    Chunking bounds the index width and spreads the kept entries over the whole vector, which a
    global top-k of a pseudo-gradient would concentrate in a few layers.
    """

    sparse = True
    part_names = frozenset({"indices", "values", "scales"})

    def __init__(self, density_text: str, bits: int, chunk: int = DEFAULT_CHUNKTOPK_CHUNK) -> None:
        self.density, self.density_text = _exact_ratio("chunktopk DENSITY", density_text)
        _check_width("chunktopk", bits)
        _check_chunk("chunktopk", chunk)
        self.bits, self.chunk = bits, chunk
        self.index_bits = (chunk - 1).bit_length()  # ceil(log2(chunk)): enough for positions 0..chunk-1
        self.spec = f"chunktopk:{self.density_text}:{bits}" + ("" if chunk == DEFAULT_CHUNKTOPK_CHUNK else f":{chunk}")

    def kept(self, length: int) -> int:
        """Entries kept of a chunk of ``length`` entries."""
        return max(1, math.ceil(self.density * length))

    def kept_total(self, numel: int) -> int:
        """Entries kept of a tensor of ``numel`` entries, over all its chunks."""
        full, short = divmod(numel, self.chunk)
        return full * self.kept(self.chunk) + (self.kept(short) if short else 0)

    def encode(self, tensor: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        flat = _floating_flat(self.spec, tensor).to(torch.float32)
        indices, codes, scales = [], [], []
        for rows in _chunk_rows(flat, self.chunk):
            chosen = _top_in_rows(rows, self.kept(rows.shape[1]))
            kept = rows.gather(1, chosen)
            row_scales = torch.linalg.vector_norm(kept, ord=math.inf, dim=1)
            indices.append(chosen.reshape(-1))
            codes.append(_quantise(kept, row_scales, self.bits).reshape(-1))
            scales.append(row_scales)
        return {
            "indices": pack_bits(torch.cat(indices), self.index_bits),
            "values": pack_bits(torch.cat(codes), self.bits),
            "scales": torch.cat(scales),
        }

    def decode(self, parts: dict[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
        _require_floating(self.spec, dtype)
        _check_names(self.spec, parts, self.part_names)
        numel = math.prod(shape)
        total = self.kept_total(numel)
        indices = _checked_codes(self.spec, parts, "indices", self.index_bits, total)
        codes = _checked_codes(self.spec, parts, "values", self.bits, total)
        scales = _checked_scales(self.spec, parts, -(-numel // self.chunk))
        decoded = torch.zeros(numel, dtype=torch.float32, device=indices.device)
        done = first_chunk = 0
        for rows in _chunk_rows(decoded, self.chunk):
            count, length = rows.shape
            k = self.kept(length)
            taken = slice(done, done + count * k)
            row_indices = self._checked_rows(indices[taken].view(count, k).long(), length, first_chunk)
            row_scales = scales[first_chunk : first_chunk + count]
            rows.scatter_(1, row_indices, _dequantise(codes[taken].view(count, k), row_scales, self.bits))
            done, first_chunk = done + count * k, first_chunk + count
        return decoded.to(dtype).reshape(shape)

    def _checked_rows(self, indices: torch.Tensor, length: int, first_chunk: int) -> torch.Tensor:
        """Indices of chunks of ``length`` entries, one chunk a row, refused unless increasing and in range."""
        if not bool((indices[:, 1:] > indices[:, :-1]).all()):
            raise CodecError(f"{self.spec}: indices must be strictly increasing within each chunk")
        # Increasing, so each row's last index is its largest; codes are unsigned, so none is negative.
        beyond = (indices[:, -1] >= length).nonzero()
        if beyond.numel():
            chunk = first_chunk + int(beyond[0])
            raise CodecError(f"{self.spec}: an index of chunk {chunk} is outside its [0, {length})")
        return indices


def parse_codec(spec: str) -> Codec:
    """The codec a spec names; CodecError, naming the valid forms, for anything else."""
    stages = spec.split("+")
    if len(stages) > 2:
        raise _spec_error(spec, "at most two stages may be joined with '+'")
    first = _parse_stage(spec, stages[0])
    if len(stages) == 1:
        return first
    if not isinstance(first, Sparsifier):
        raise _spec_error(spec, f"only topk or randk may come before '+', not {stages[0]!r}")
    second = _parse_stage(spec, stages[1])
    if not isinstance(second, Cast | BlockInt8 | Quant):
        raise _spec_error(spec, f"after '+' comes fp16, bf16, int8[:BLOCK] or quant:BITS[:CHUNK], not {stages[1]!r}")
    return type(first)(first.ratio_text, second)


_CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}
_SPARSIFIERS: dict[str, type[Sparsifier]] = {"topk": TopK, "randk": RandK}


def wire_bytes(parts: dict[str, torch.Tensor]) -> int:
    """Bytes of tensor data that the parts put on the wire, before the message header."""
    return sum(part.numel() * part.element_size() for part in parts.values())


def packed_bytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take once packed."""
    return -(-count * bits // 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2**bits) packed densely into uint8, 1 <= bits <= 16, on their device.

    Code i takes bits i * bits to (i + 1) * bits - 1 of the stream, least significant first, and
    stream bit b is bit b % 8 of byte b // 8: so byte 0 holds code 0's low bits, and the bits
    past the last code are zero. Codes are not checked; those out of range corrupt their neighbours.
    """
    _check_packable(bits)
    count = codes.numel()
    if 8 % bits == 0:
        return _pack_whole_bytes(codes, bits)
    # Eight codes fill exactly `bits` bytes, so groups of eight share one layout: a few column
    # operations over all groups instead of work per code.
    groups = torch.zeros(-(-count // 8) * 8, dtype=torch.int32, device=codes.device)
    groups[:count] = codes.reshape(-1)
    groups = groups.view(-1, 8)
    packed = torch.zeros(groups.shape[0], bits, dtype=torch.int32, device=codes.device)
    for byte, code, shift in _bit_layout(bits):
        moved = groups[:, code] << shift if shift >= 0 else groups[:, code] >> -shift
        packed[:, byte] |= moved & 0xFF
    return packed.to(torch.uint8).view(-1)[: packed_bytes(count, bits)]


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes of ``bits`` bits in ``packed`` (as ``pack_bits`` lays them out), as int32.

    ``packed`` must hold at least ``packed_bytes(count, bits)`` bytes; bits past the last code are ignored.
    """
    _check_packable(bits)
    if 8 % bits == 0:
        return _unpack_whole_bytes(packed, bits, count)
    groups = -(-count // 8)
    padded = torch.zeros(groups * bits, dtype=torch.int32, device=packed.device)
    used = min(packed.numel(), padded.numel())
    padded[:used] = packed[:used]
    padded = padded.view(groups, bits)
    codes = torch.zeros(groups, 8, dtype=torch.int32, device=packed.device)
    for byte, code, shift in _bit_layout(bits):
        codes[:, code] |= padded[:, byte] >> shift if shift >= 0 else padded[:, byte] << -shift
    return codes.view(-1)[:count].bitwise_and_((1 << bits) - 1)


def _pack_whole_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``pack_bits`` for widths that divide 8: no code straddles a byte, so uint8 arithmetic suffices."""
    per_byte = 8 // bits
    if per_byte == 1:
        return codes.to(torch.uint8).reshape(-1)
    count = codes.numel()
    padded = torch.zeros(-(-count // per_byte) * per_byte, dtype=torch.uint8, device=codes.device)
    padded[:count] = codes.reshape(-1)
    padded = padded.view(-1, per_byte)
    packed = padded[:, 0].clone()
    for slot in range(1, per_byte):
        packed |= padded[:, slot] << (bits * slot)
    return packed


def _unpack_whole_bytes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """``unpack_bits`` for widths that divide 8: every byte splits into 8 / bits codes at once."""
    per_byte = 8 // bits
    used = packed[: -(-count // per_byte)]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (used[:, None] >> shifts).bitwise_and_((1 << bits) - 1)
    return codes.view(-1)[:count].to(torch.int32)


def _check_packable(bits: int) -> None:
    if not 1 <= bits <= MAX_PACKED_BITS:
        raise ValueError(f"codes of {bits} bits cannot be packed: 1 to {MAX_PACKED_BITS} bits")


@functools.cache
def _bit_layout(bits: int) -> tuple[tuple[int, int, int], ...]:
    """(byte, code, shift) for each byte of a group of eight codes and each code with bits in it.

    Bit p of the code is bit p + shift of the byte.
    """
    return tuple(
        (byte, code, bits * code - 8 * byte)
        for byte in range(bits)
        for code in range(8)
        if bits * code < 8 * byte + 8 and bits * code + bits > 8 * byte
    )


def _parse_stage(spec: str, stage: str) -> Codec:
    if not stage:
        raise _spec_error(spec, "empty part")
    name, has_argument, argument = stage.partition(":")
    if name in ("none", *_CASTS) and has_argument:
        raise _spec_error(spec, f"{name} takes no argument")
    if name == "none":
        return Identity()
    if name in _CASTS:
        return Cast(name, _CASTS[name])
    try:
        if name == "int8":
            return BlockInt8(_integer("int8 BLOCK", argument)) if has_argument else BlockInt8()
        if name in _SPARSIFIERS:
            return _SPARSIFIERS[name](_decimal(f"{name} RATIO", argument))
        if name == "quant":
            bits, *chunk = _arguments(name, has_argument, argument, "BITS[:CHUNK]", 1)
            return Quant(_integer("quant BITS", bits), *(_integer("quant CHUNK", text) for text in chunk))
        if name == "chunktopk":
            density, bits, *chunk = _arguments(name, has_argument, argument, "DENSITY:BITS[:CHUNK]", 2)
            chunk_sizes = (_integer("chunktopk CHUNK", text) for text in chunk)
            return ChunkTopK(_decimal("chunktopk DENSITY", density), _integer("chunktopk BITS", bits), *chunk_sizes)
    except CodecError as error:
        raise _spec_error(spec, str(error)) from None
    raise _spec_error(spec, f"unknown codec {name!r}")


def _arguments(name: str, has_argument: bool, argument: str, form: str, required: int) -> list[str]:
    """The ':'-separated arguments of a stage: ``required`` of them, then at most one optional."""
    fields = argument.split(":") if has_argument else []
    if not required <= len(fields) <= required + 1:
        raise CodecError(f"{name} takes {form}, not {argument!r}")
    return fields


def _integer(what: str, text: str) -> int:
    if not _BLOCK.fullmatch(text):
        raise CodecError(f"{what} {text!r} is not an integer")
    return int(text)


def _decimal(what: str, text: str) -> str:
    # Decimal() alone would take nan, inf and exponents too large to turn into a Fraction cheaply.
    if not _RATIO.fullmatch(text):
        raise CodecError(f"{what} {text!r} is not a decimal number such as 0.01 or 1e-3")
    return text


def _exact_ratio(what: str, text: str) -> tuple[Fraction, str]:
    """A ratio in (0, 1] and its canonical text."""
    ratio = Decimal(text).normalize()
    # Exact, so that e.g. topk:0.07 keeps 7 of 100 entries, not ceil(7.000000000000001) = 8.
    exact = Fraction(ratio)
    if not 0 < exact <= 1:
        raise CodecError(f"{what} {text} is outside (0, 1]")
    return exact, str(ratio)


def _check_width(name: str, bits: int) -> None:
    if bits not in QUANT_WIDTHS:
        raise CodecError(f"{name} BITS {bits} is not one of {', '.join(map(str, QUANT_WIDTHS))}")


def _check_chunk(name: str, chunk: int) -> None:
    if not MIN_INT8_BLOCK <= chunk <= MAX_INT8_BLOCK:
        raise CodecError(f"{name} CHUNK {chunk} is outside [{MIN_INT8_BLOCK}, {MAX_INT8_BLOCK}]")


def _spec_error(spec: str, reason: str) -> CodecError:
    return CodecError(f"bad codec spec {spec[:100]!r}: {reason}. Valid: {VALID_SPECS}")


def _floating_flat(spec: str, tensor: torch.Tensor) -> torch.Tensor:
    _require_floating(spec, tensor.dtype)
    return tensor.detach().reshape(-1)


def _require_floating(spec: str, dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise TypeError(f"{spec} is lossy and only takes floating-point tensors, not {dtype}")


def _check_names(spec: str, parts: dict[str, torch.Tensor], expected: frozenset[str]) -> None:
    if parts.keys() != expected:
        missing, extra = sorted(expected - parts.keys()), sorted(parts.keys() - expected)
        raise CodecError(f"{spec}: parts differ (missing {missing}, unexpected {extra[:3]})")


def _checked_part(spec: str, parts: dict[str, torch.Tensor], name: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    part = parts[name]
    if part.dtype != dtype:
        raise CodecError(f"{spec}: part {name!r} has dtype {part.dtype}, expected {dtype}")
    if part.shape != (numel,):
        raise CodecError(f"{spec}: part {name!r} has shape {tuple(part.shape)}, expected ({numel},)")
    return part


def _checked_codes(spec: str, parts: dict[str, torch.Tensor], name: str, bits: int, count: int) -> torch.Tensor:
    """The ``count`` codes of a packed part, refused if its size is wrong or a bit past the last code is set."""
    packed = _checked_part(spec, parts, name, torch.uint8, packed_bytes(count, bits))
    used = count * bits % 8
    # Bits past the last code carry nothing: a set one marks a part corrupted or forged.
    if used and int(packed[-1]) >> used:
        raise CodecError(f"{spec}: part {name!r} has bits set past its last code")
    return unpack_bits(packed, bits, count)


def _checked_scales(spec: str, parts: dict[str, torch.Tensor], count: int) -> torch.Tensor:
    scales = _checked_part(spec, parts, "scales", torch.float32, count)
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise CodecError(f"{spec}: scales must be finite and non-negative")
    return scales


def _chunk_rows(flat: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """The full chunks as rows of a matrix, then the short last chunk (if any) as one row: no padding copy."""
    full = flat.numel() // chunk * chunk
    rows = [flat[:full].view(-1, chunk)]
    if full < flat.numel():
        rows.append(flat[full:].view(1, -1))
    return rows


def _split_like_rows(scales: torch.Tensor, numel: int, chunk: int) -> list[torch.Tensor]:
    """One value per chunk, split like ``_chunk_rows`` splits the chunks."""
    full_chunks = numel // chunk
    return [scales[:full_chunks]] + ([scales[full_chunks:]] if full_chunks < scales.numel() else [])


def _quantise(rows: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Mid-rise codes in [0, 2**bits) of float32 rows, one scale (the row's max|x|) per row."""
    half = 2 ** (bits - 1)
    # A zero row divides by 1, so that its codes are finite; it decodes to 0 through its scale.
    divisors = torch.where(scales > 0, scales, 1.0)
    codes = (rows / divisors[:, None]).add_(1).mul_(half).floor_()
    # x == scale lands on code 2**bits, one past the top cell; NaN (refused through its scale) on 0.
    return codes.clamp_(0, 2 * half - 1).nan_to_num_(0).to(torch.uint8)


def _dequantise(codes: torch.Tensor, scales: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 rows of the middles of the codes' cells: scale * ((2q + 1) / L - 1)."""
    levels = 2**bits
    return torch.mul(codes, 2 / levels, out=out).add_(1 / levels - 1).mul_(scales[:, None])


def _top_in_rows(rows: torch.Tensor, kept: int) -> torch.Tensor:
    """Each row's ``kept`` column indices of largest magnitude, increasing; ties to the lowest index, NaN largest."""
    count, length = rows.shape
    if kept == length:
        return torch.arange(kept, device=rows.device).expand(count, kept)
    magnitude = rows.abs().nan_to_num_(nan=math.inf)
    # One entry more than kept: where the smallest of them is the only one of its magnitude, the
    # other `kept` are the row's top without ambiguity, and no pass over whole rows finds ties.
    top = magnitude.topk(kept + 1, dim=1, sorted=False)
    smallest, extra = top.values.min(dim=1, keepdim=True)
    others = torch.arange(kept + 1, device=rows.device) != extra
    chosen = top.indices[others].view(count, kept).sort(dim=1).values
    # Elsewhere topk broke a tie at the threshold in no specified order: those rows (few unless
    # many entries are equal, as in a zero chunk) take the lowest indices.
    unsettled = ((top.values == smallest).sum(1) > 1).nonzero().squeeze(1)
    if unsettled.numel():
        chosen[unsettled] = _lowest_ties(magnitude[unsettled], smallest[unsettled], kept)
    return chosen


def _lowest_ties(magnitude: torch.Tensor, threshold: torch.Tensor, kept: int) -> torch.Tensor:
    """Per row, the entries above the threshold and then the first tied ones: ``kept`` indices, increasing."""
    above = magnitude > threshold
    tied = magnitude == threshold
    room = kept - above.sum(1, keepdim=True)
    keep = above | (tied & (tied.cumsum(1) <= room))
    return keep.nonzero()[:, 1].view(-1, kept)


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def _likely_top(magnitude: torch.Tensor, kept: int) -> torch.Tensor:
    """Ascending indices of a set that surely holds the ``kept`` largest magnitudes and all entries tied with them.

    A threshold estimated from a strided sample lets about twice ``kept`` entries through, so
    that topk sorts out those instead of all (5x faster for 1% of 1M entries). The result is
    exact whatever the sample: if fewer than ``kept`` pass, all indices are returned.
    """
    numel = magnitude.numel()
    stride = kept // _SAMPLE_TOP
    if stride < 2 or 8 * kept > numel:
        return torch.arange(numel, device=magnitude.device)
    estimate = magnitude[::stride].topk(2 * _SAMPLE_TOP, sorted=False).values.min()
    candidates = (magnitude >= estimate).nonzero().squeeze(1)
    return candidates if candidates.numel() >= kept else torch.arange(numel, device=magnitude.device)


def _random_subset(numel: int, kept: int, seed: int) -> torch.Tensor:
    """``kept`` distinct indices in [0, numel), sorted, uniformly random for ``seed``.

    Drawn on the CPU generator on both sides, since CUDA generators give other streams.
    """
    generator = torch.Generator().manual_seed(seed)
    if 4 * kept >= numel:
        return torch.randperm(numel, generator=generator)[:kept].sort().values
    # Few of many: a permutation of all entries would cost far more than the values sent. The
    # first `kept` distinct draws with replacement are a uniform subset, as drawing without
    # replacement is drawing with replacement and skipping repeats.
    draws = torch.empty(0, dtype=torch.int64)
    while True:
        draws = torch.cat([draws, torch.randint(numel, (2 * kept,), generator=generator)])
        distinct, inverse = torch.unique(draws, return_inverse=True)
        if distinct.numel() >= kept:
            break
    first_draw = torch.full_like(distinct, draws.numel())
    first_draw.scatter_reduce_(0, inverse, torch.arange(draws.numel()), "amin")
    return distinct[first_draw.argsort()[:kept]].sort().values
