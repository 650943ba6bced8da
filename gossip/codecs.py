"""Compression codecs for the tensors that peers send: casts, block int8, top-k and random-k.

A codec turns one tensor into named parts for the wire and back. Every part is 1-D and of a
dtype the wire carries. Specs, as they appear in ``Message.codec`` and on the command line:

    none | fp16 | bf16 | int8[:BLOCK] | topk:RATIO | randk:RATIO | SPARSIFIER+VALUE

where a composition such as ``topk:0.01+int8`` encodes the kept values with the value codec
(fp16, bf16 or int8[:BLOCK]). Part names: ``values`` (all codecs), ``scales`` (int8),
``indices`` (top-k); in a composition the value codec's parts are prefixed with ``kept.``.

Decoding never trusts the sender: every part is checked against the shape and dtype that the
receiver expects before anything is allocated from it or scattered with it.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from decimal import Decimal
from fractions import Fraction

import torch

VALID_SPECS = (
    "none, fp16, bf16, int8[:BLOCK] (BLOCK an integer in [8, 65536], default 256), "
    "topk:RATIO, randk:RATIO (RATIO a number in (0, 1]), "
    "or SPARSIFIER+VALUE such as topk:0.01+int8 (VALUE one of fp16, bf16, int8[:BLOCK])"
)
DEFAULT_INT8_BLOCK = 256
MIN_INT8_BLOCK, MAX_INT8_BLOCK = 8, 65536
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
        scales = _checked_part(self.spec, parts, "scales", torch.float32, self._block_count(numel))
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise CodecError(f"{self.spec}: scales must be finite and non-negative")
        if bool((values < -INT8_LEVELS).any()):
            raise CodecError(f"{self.spec}: values must lie in [-{INT8_LEVELS}, {INT8_LEVELS}]")
        decoded = torch.empty(numel, dtype=torch.float32, device=values.device)
        for quantised, row_scales, rows in zip(self._rows(values), self._split(scales, numel), self._rows(decoded)):
            torch.mul(quantised, row_scales[:, None], out=rows)
        return decoded.to(dtype).reshape(shape)

    def _block_count(self, numel: int) -> int:
        return -(-numel // self.block)

    def _rows(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The full blocks as rows of a matrix, then the short last block (if any) as one row: no padding copy."""
        full = flat.numel() // self.block * self.block
        rows = [flat[:full].view(-1, self.block)]
        if full < flat.numel():
            rows.append(flat[full:].view(1, -1))
        return rows

    def _split(self, scales: torch.Tensor, numel: int) -> list[torch.Tensor]:
        """Scales split like ``_rows`` splits the blocks."""
        full_blocks = numel // self.block
        return [scales[:full_blocks]] + ([scales[full_blocks:]] if full_blocks < scales.numel() else [])


class Sparsifier(Codec):
    """Keeps k = max(1, ceil(ratio * numel)) entries (none of an empty tensor) and zeros the rest.

    Kept values travel in the tensor's dtype, or through a value codec when composed.
    """

    name: str

    def __init__(self, ratio_text: str, values: Codec | None = None) -> None:
        ratio = Decimal(ratio_text).normalize()
        # Exact, so that e.g. topk:0.07 keeps 7 of 100 entries, not ceil(7.000000000000001) = 8.
        self.ratio = Fraction(ratio)
        if not 0 < self.ratio <= 1:
            raise CodecError(f"{self.name} RATIO {ratio_text} is outside (0, 1]")
        self.ratio_text = str(ratio)
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
    if not isinstance(second, Cast | BlockInt8):
        raise _spec_error(spec, f"after '+' comes fp16, bf16 or int8[:BLOCK], not {stages[1]!r}")
    return type(first)(first.ratio_text, second)


_CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}
_SPARSIFIERS: dict[str, type[Sparsifier]] = {"topk": TopK, "randk": RandK}


def wire_bytes(parts: dict[str, torch.Tensor]) -> int:
    """Bytes of tensor data that the parts put on the wire, before the message header."""
    return sum(part.numel() * part.element_size() for part in parts.values())


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
            if has_argument and not _BLOCK.fullmatch(argument):
                raise CodecError(f"int8 BLOCK {argument!r} is not an integer")
            return BlockInt8(int(argument)) if has_argument else BlockInt8()
        if name in _SPARSIFIERS:
            if not _RATIO.fullmatch(argument):
                raise CodecError(f"{name} RATIO {argument!r} is not a decimal number such as 0.01 or 1e-3")
            return _SPARSIFIERS[name](argument)
    except CodecError as error:
        raise _spec_error(spec, str(error)) from None
    raise _spec_error(spec, f"unknown codec {name!r}")


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
