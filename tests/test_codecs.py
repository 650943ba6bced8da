"""Compression codecs: round trips, error bounds, contraction, determinism, byte counts, bit
packing, and a precise refusal of every malformed encoding and bad spec."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.codecs import CodecError, pack_bits, packed_bytes, parse_codec, unpack_bits, wire_bytes
from gossip.message import Message
from gossip.wire import Limits
from gossip.wire import decode as wire_decode
from gossip.wire import encode as wire_encode

SPECS = [
    "none", "fp16", "bf16", "int8", "int8:8",
    "topk:0.01", "topk:0.3", "randk:0.01", "randk:0.3",
    "topk:0.01+int8", "topk:0.05+bf16", "topk:0.2+int8:16", "randk:0.1+fp16", "randk:0.5+int8",
    "quant:2", "quant:4:8", "quant:8", "chunktopk:0.1:4", "chunktopk:0.02:2:8", "chunktopk:1:8:16",
    "topk:0.2+quant:4", "randk:0.5+quant:2:16",
]
SHAPES = [(), (0,), (1,), (7,), (3, 0, 2), (4, 5), (33, 17)]
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
WIRE_DTYPES = {
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
}
# The devices this machine has: a GPU machine checks CUDA too, a CPU one runs the same tests on CPU.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FAST = settings(max_examples=40, deadline=None)


def round_trip(spec: str, tensor: torch.Tensor, seed: int = 0) -> torch.Tensor:
    codec = parse_codec(spec)
    return codec.decode(codec.encode(tensor, seed), tensor.shape, tensor.dtype, seed)


def float32_vectors(min_size: int = 1, max_size: int = 300, bound: float = 1e30) -> st.SearchStrategy[torch.Tensor]:
    bound = torch.tensor(bound, dtype=torch.float32).item()  # hypothesis wants bounds exact in float32
    values = st.floats(-bound, bound, width=32, allow_nan=False, allow_infinity=False)
    return st.lists(values, min_size=min_size, max_size=max_size).map(lambda xs: torch.tensor(xs, dtype=torch.float32))


def normal_range_vectors(smallest: float, largest: float) -> st.SearchStrategy[torch.Tensor]:
    smallest, largest = torch.tensor([smallest, largest], dtype=torch.float32).tolist()
    magnitudes = st.floats(smallest, largest, width=32)
    signed = st.tuples(magnitudes, st.booleans()).map(lambda pair: -pair[0] if pair[1] else pair[0])
    return st.lists(signed, min_size=1, max_size=200).map(lambda xs: torch.tensor(xs, dtype=torch.float32))


def stable_top_indices(tensor: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest magnitudes, ties to the lowest index, by a full stable sort: the rule topk must follow."""
    order = torch.sort(tensor.abs().reshape(-1), descending=True, stable=True).indices
    return order[:k].sort().values


# Round trips


def check_round_trip(spec: str, tensor: torch.Tensor) -> None:
    dtype = tensor.dtype
    codec = parse_codec(spec)
    parts = codec.encode(tensor, seed=5)
    assert parts.keys() == codec.part_names
    for part in parts.values():
        assert part.dtype in WIRE_DTYPES and part.dim() == 1 and part.device == tensor.device
    decoded = codec.decode(parts, tensor.shape, dtype, seed=5)
    assert decoded.shape == tensor.shape and decoded.dtype == dtype and decoded.device == tensor.device
    assert bool(torch.isfinite(decoded).all())


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spec", SPECS)
def test_round_trip_keeps_shape_dtype_and_device(spec, shape, dtype):
    check_round_trip(spec, torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SPECS)
def test_round_trip_on_every_device_here(spec, device):
    for shape in SHAPES:
        check_round_trip(spec, torch.randn(shape, device=device))


@pytest.mark.parametrize("spec", SPECS)
def test_parts_survive_the_wire(spec):
    tensor = torch.randn(40, 25, generator=torch.Generator().manual_seed(2))
    parts = parse_codec(spec).encode(tensor, seed=9)
    message = Message("delta", "peer-a", 3, parts, codec=spec)
    assert message.payload_size() == wire_bytes(parts)
    received = wire_decode(b"".join(wire_encode(message)), Limits(max_payload_bytes=1 << 20))
    codec = parse_codec(received.codec)
    from_wire = codec.decode(received.tensors, tensor.shape, tensor.dtype, seed=9)
    assert torch.equal(from_wire, round_trip(spec, tensor, seed=9))


def test_decoded_tensor_does_not_share_memory_with_the_parts():
    tensor = torch.randn(10)
    parts = parse_codec("none").encode(tensor, 0)
    decoded = parse_codec("none").decode(parts, tensor.shape, tensor.dtype, 0)
    decoded.add_(1)
    assert torch.equal(parts["values"], tensor.reshape(-1))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_none_carries_any_dtype_exactly_and_lossy_codecs_refuse_integers(dtype):
    tensor = torch.randint(0, 2, (6, 3)).to(dtype)
    assert torch.equal(round_trip("none", tensor), tensor)
    for spec in ("fp16", "int8", "topk:0.5", "randk:0.5+int8", "quant:4", "chunktopk:0.5:4"):
        with pytest.raises(TypeError, match="floating-point"):
            parse_codec(spec).encode(tensor, 0)


# Error bounds


@FAST
@given(float32_vectors(bound=3.4e38))
def test_none_is_exact(tensor):
    assert torch.equal(round_trip("none", tensor), tensor)
    assert parse_codec("none").lossless and not any(parse_codec(spec).lossless for spec in SPECS[1:])


@FAST
@given(normal_range_vectors(2.0**-14, 65504.0))
def test_fp16_relative_error_within_unit_roundoff(tensor):
    decoded = round_trip("fp16", tensor)
    assert bool(((decoded - tensor).abs() <= tensor.abs() * 2.0**-11).all())


@FAST
@given(normal_range_vectors(2.0**-126, 1e38))
def test_bf16_relative_error_within_unit_roundoff(tensor):
    decoded = round_trip("bf16", tensor).double()
    assert bool(((decoded - tensor.double()).abs() <= tensor.double().abs() * 2.0**-8).all())


@FAST
@given(float32_vectors(max_size=600), st.sampled_from([8, 16, 100, 256]))
def test_int8_error_within_half_a_scale_step(tensor, block):
    codec = parse_codec(f"int8:{block}")
    parts = codec.encode(tensor, 0)
    decoded = codec.decode(parts, tensor.shape, tensor.dtype, 0).double()
    x = tensor.double()
    blocks = x.split(block)
    scales = torch.stack([chunk.abs().max() / 127 for chunk in blocks])
    torch.testing.assert_close(parts["scales"].double(), scales, rtol=2**-23, atol=2**-149)  # subnormal scales round
    per_element = torch.cat([scale.expand(len(chunk)) for scale, chunk in zip(scales, blocks)])
    # Slack for float32 rounding in x / scale and q * scale, and for subnormal scales.
    assert bool(((x - decoded).abs() <= per_element * (0.5 + 1e-4) + 1e-40).all())


def per_chunk(values: torch.Tensor, chunk: int, counts: list[int]) -> torch.Tensor:
    """One value per chunk of ``chunk`` entries, repeated ``counts[i]`` times for chunk i."""
    return torch.cat([value.expand(count) for value, count in zip(values, counts)])


@FAST
@given(float32_vectors(max_size=600), st.sampled_from([2, 4, 8]), st.sampled_from([8, 16, 100, 256]))
def test_quant_scales_are_chunk_maxima_and_values_decode_within_scale_over_levels(tensor, bits, chunk):
    codec = parse_codec(f"quant:{bits}:{chunk}")
    parts = codec.encode(tensor, 0)
    chunks = tensor.split(chunk)
    assert torch.equal(parts["scales"], torch.stack([piece.abs().max() for piece in chunks]))  # exact: no division
    decoded = codec.decode(parts, tensor.shape, tensor.dtype, 0).double()
    bound = per_chunk(parts["scales"].double() / 2**bits, chunk, [len(piece) for piece in chunks])
    # Slack for float32 rounding in x / scale and in the decoded products, and for subnormals.
    assert bool(((tensor.double() - decoded).abs() <= bound * (1 + 1e-4) + 1e-44).all())


def test_quant_codes_are_mid_rise_cells_packed_least_significant_bits_first():
    tensor = torch.tensor([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0])
    codec = parse_codec("quant:2:8")
    parts = codec.encode(tensor, 0)
    # Codes floor((x + 1) * 2), the top one clamped: 0 1 1 2 2 3 3 3, four to a byte from the low bits.
    assert parts["values"].tolist() == [0b10_01_01_00, 0b11_11_11_10]
    assert parts["scales"].tolist() == [1.0]
    decoded = codec.decode(parts, tensor.shape, tensor.dtype, 0)
    assert decoded.tolist() == [-0.75, -0.25, -0.25, 0.25, 0.25, 0.75, 0.75, 0.75]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quant_zero_chunk_decodes_to_exact_zeros_beside_a_nonzero_short_chunk(bits):
    tensor = torch.cat([torch.zeros(16), torch.tensor([0.0, 3.0, -1.5])])
    codec = parse_codec(f"quant:{bits}:16")
    parts = codec.encode(tensor, 0)
    assert parts["scales"].tolist() == [0.0, 3.0]
    decoded = codec.decode(parts, tensor.shape, tensor.dtype, 0)
    assert bool((decoded[:16] == 0).all())
    assert bool(((decoded[16:] - tensor[16:]).abs() <= 3.0 / 2**bits).all())
    assert decoded[16] != 0  # mid-rise: no zero level inside a nonzero chunk


@FAST
@given(float32_vectors(max_size=400, bound=1e6), st.sampled_from([0.01, 0.1, 0.37, 1.0]))
def test_topk_keeps_exactly_the_largest_magnitudes(tensor, ratio):
    codec = parse_codec(f"topk:{ratio}")
    k = max(1, math.ceil(ratio * tensor.numel()))
    parts = codec.encode(tensor, 0)
    assert torch.equal(parts["indices"].long(), stable_top_indices(tensor, k))
    decoded = codec.decode(parts, tensor.shape, tensor.dtype, 0)
    kept = torch.zeros(tensor.numel(), dtype=torch.bool)
    kept[parts["indices"].long()] = True
    assert torch.equal(decoded[kept], tensor[kept])
    assert bool((decoded[~kept] == 0).all())


@FAST
@given(
    st.integers(0, 2**32),
    st.sampled_from(["normal", "few_values", "mostly_zero"]),
    st.sampled_from([0.01, 0.02, 0.1]),
)
def test_topk_breaks_ties_by_lowest_index_on_large_tensors(seed, kind, ratio):
    # Large enough that the sampled threshold prefilter runs (k >= 128 and k <= numel / 8).
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(30_000, generator=generator)
    if kind == "few_values":
        tensor = tensor.round()
    elif kind == "mostly_zero":
        tensor = tensor * (torch.rand(30_000, generator=generator) < 0.005)
    k = math.ceil(ratio * tensor.numel())
    assert torch.equal(parse_codec(f"topk:{ratio}").encode(tensor, 0)["indices"].long(), stable_top_indices(tensor, k))


def chunk_lengths(numel: int, chunk: int) -> list[int]:
    return [min(chunk, numel - start) for start in range(0, numel, chunk)]


def chunk_top_indices(tensor: torch.Tensor, density: float, chunk: int) -> list[torch.Tensor]:
    """Per chunk, the within-chunk indices that chunktopk must keep, by a full stable sort."""
    return [
        stable_top_indices(piece, max(1, math.ceil(Fraction(str(density)) * len(piece))))
        for piece in tensor.reshape(-1).split(chunk)
    ]


def sent_indices(codec, parts: dict[str, torch.Tensor], numel: int) -> list[torch.Tensor]:
    """The packed within-chunk indices, one tensor per chunk."""
    flat = unpack_bits(parts["indices"], codec.index_bits, codec.kept_total(numel)).long()
    return list(flat.split([codec.kept(length) for length in chunk_lengths(numel, codec.chunk)]))


@FAST
@given(
    float32_vectors(max_size=400, bound=1e6),
    st.sampled_from([0.01, 0.1, 0.37, 1.0]),
    st.sampled_from([2, 4, 8]),
    st.sampled_from([8, 13, 64]),
)
def test_chunktopk_keeps_each_chunks_largest_and_decodes_them_within_scale_over_levels(tensor, density, bits, chunk):
    codec = parse_codec(f"chunktopk:{density}:{bits}:{chunk}")
    parts = codec.encode(tensor, 0)
    expected = chunk_top_indices(tensor, density, chunk)
    assert [index.tolist() for index in sent_indices(codec, parts, tensor.numel())] == [e.tolist() for e in expected]
    chunks = tensor.split(chunk)
    assert torch.equal(parts["scales"], torch.stack([piece.abs().max() for piece in chunks]))
    kept = torch.cat([index + start for index, start in zip(expected, range(0, tensor.numel(), chunk))])
    decoded = codec.decode(parts, tensor.shape, tensor.dtype, 0).double()
    bound = per_chunk(parts["scales"].double() / 2**bits, chunk, [len(index) for index in expected])
    assert bool(((decoded[kept] - tensor.double()[kept]).abs() <= bound * (1 + 1e-4) + 1e-44).all())
    dropped = torch.ones(tensor.numel(), dtype=torch.bool)
    dropped[kept] = False
    assert bool((decoded[dropped] == 0).all())


def test_chunktopk_breaks_ties_by_lowest_index_within_each_chunk_and_the_short_last_one():
    tensor = torch.tensor([
        1.0, 1, 1, 1, 1, 1, 1, 1,  # all tied: the first two
        0, 3, -3, 3, 0, 0, 0, 0,  # three tied for two places
        2, -2, 2, -2,  # the short last chunk keeps max(1, ceil(0.25 * 4)) = 1
    ])
    codec = parse_codec("chunktopk:0.25:4:8")
    parts = codec.encode(tensor, 0)
    assert [index.tolist() for index in sent_indices(codec, parts, 20)] == [[0, 1], [1, 2], [0]]
    decoded = codec.decode(parts, tensor.shape, tensor.dtype, 0)
    assert decoded.nonzero().squeeze(1).tolist() == [0, 1, 9, 10, 16]


@FAST
@given(
    st.integers(0, 2**32),
    st.sampled_from(["normal", "few_values", "mostly_zero"]),
    st.sampled_from([0.01, 0.02, 0.1]),
)
def test_chunktopk_breaks_ties_by_lowest_index_on_large_vectors(seed, kind, density):
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(30_000, generator=generator)  # 7 chunks of 4096 and a short one of 1328
    if kind == "few_values":
        tensor = tensor.round()
    elif kind == "mostly_zero":
        tensor = tensor * (torch.rand(30_000, generator=generator) < 0.005)
    codec = parse_codec(f"chunktopk:{density}:4")
    sent = sent_indices(codec, codec.encode(tensor, 0), tensor.numel())
    assert [index.tolist() for index in sent] == [index.tolist() for index in chunk_top_indices(tensor, density, 4096)]


def test_chunktopk_keeps_the_first_entries_of_a_zero_chunk_and_decodes_it_to_zeros():
    tensor = torch.cat([torch.zeros(8), torch.arange(1.0, 9.0)])
    codec = parse_codec("chunktopk:0.25:2:8")
    parts = codec.encode(tensor, 0)
    assert [index.tolist() for index in sent_indices(codec, parts, 16)] == [[0, 1], [6, 7]]
    assert parts["scales"].tolist() == [0.0, 8.0]
    decoded = codec.decode(parts, tensor.shape, tensor.dtype, 0)
    assert decoded.tolist() == [0.0] * 14 + [6.0, 6.0]  # 7 and 8 both lie in the top cell, [4, 8], of middle 6


def test_chunktopk_counts_nan_as_largest_and_its_chunk_cannot_be_decoded():
    tensor = torch.tensor([1.0, float("nan"), -3.0, 2.0, 0, 0, 0, 0, 5, 1, 0, 0, 0, 0, 0, 0])
    codec = parse_codec("chunktopk:0.25:4:8")
    parts = codec.encode(tensor, 0)
    assert [index.tolist() for index in sent_indices(codec, parts, 16)] == [[1, 2], [0, 1]]
    with pytest.raises(CodecError, match="finite"):
        codec.decode(parts, tensor.shape, tensor.dtype, 0)


def test_topk_counts_nan_as_largest_and_keeps_k():
    tensor = torch.tensor([1.0, float("nan"), -3.0, 2.0])
    indices = parse_codec("topk:0.5").encode(tensor, 0)["indices"]
    assert indices.tolist() == [1, 2]


# Contraction


@FAST
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=300).map(
        lambda xs: torch.tensor(xs, dtype=torch.float64)
    ),
    st.sampled_from([0.01, 0.1, 0.5]),
)
def test_topk_is_contractive(vector, ratio):
    codec = parse_codec(f"topk:{ratio}")
    k, d = codec.kept(vector.numel()), vector.numel()
    error = (round_trip(codec.spec, vector) - vector).square().sum()
    assert error <= (1 - k / d) * vector.square().sum() * (1 + 1e-12)


@pytest.mark.parametrize("ratio", [0.2, 0.5])  # the sparse sampler, and the permutation
def test_randk_is_contractive_in_expectation_and_uniform(ratio):
    vector = torch.randn(50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    codec = parse_codec(f"randk:{ratio}")
    k, d, seeds = codec.kept(50), 50, 2000
    errors, inclusions = [], torch.zeros(d)
    for seed in range(seeds):
        decoded = codec.decode(codec.encode(vector, seed), vector.shape, vector.dtype, seed)
        errors.append(float((decoded - vector).square().sum()))
        inclusions += decoded != 0
    expected = (1 - k / d) * float(vector.square().sum())
    assert sum(errors) / seeds == pytest.approx(expected, rel=0.03)
    assert bool(((inclusions / seeds - k / d).abs() < 0.05).all())


# Determinism


@pytest.mark.parametrize("spec", SPECS)
def test_same_tensor_and_seed_give_identical_parts(spec):
    tensor = torch.randn(1000, generator=torch.Generator().manual_seed(4))
    codec = parse_codec(spec)
    first, second = codec.encode(tensor, 11), parse_codec(spec).encode(tensor.clone(), 11)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.parametrize("spec", ["randk:0.01", "randk:0.5", "randk:0.1+int8"])
def test_randk_sends_no_indices_and_draws_other_indices_for_other_seeds(spec):
    tensor = torch.rand(10_000) + 1  # no zeros, so the decoded support is the chosen indices
    codec = parse_codec(spec)
    parts = codec.encode(tensor, 1)
    assert not any("indices" in name for name in parts)
    assert all(part.dtype not in (torch.int32, torch.int64) for part in parts.values())
    supports = [codec.decode(codec.encode(tensor, seed), tensor.shape, tensor.dtype, seed) != 0 for seed in (1, 2)]
    assert all(int(support.sum()) == codec.kept(10_000) for support in supports)
    assert not torch.equal(supports[0], supports[1])


@pytest.mark.parametrize("device", DEVICES)
def test_randk_indices_do_not_depend_on_the_device(device):
    tensor = torch.randn(5000)
    codec = parse_codec("randk:0.1")
    on_cpu = codec.decode(codec.encode(tensor, 7), tensor.shape, tensor.dtype, 7)
    parts = {name: part.cpu() for name, part in codec.encode(tensor.to(device), 7).items()}
    assert torch.equal(codec.decode(parts, tensor.shape, tensor.dtype, 7), on_cpu)


# Degenerate and large tensors


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(
    "tensor",
    [torch.zeros(1000), torch.full((300,), 2.5), torch.full((300,), -0.75), torch.tensor(3.0), torch.zeros(()), torch.empty(0)],
    ids=["zeros", "constant", "negative-constant", "0-d", "0-d-zero", "empty"],
)
def test_degenerate_tensors_decode_finite(spec, tensor):
    decoded = round_trip(spec, tensor)
    assert decoded.shape == tensor.shape and bool(torch.isfinite(decoded).all())
    if spec in ("none", "fp16", "bf16", "int8", "int8:8"):
        torch.testing.assert_close(decoded, tensor, rtol=2**-20, atol=0)  # these constants are exact in 16 bits


@pytest.fixture(scope="module")
def large_tensor() -> torch.Tensor:
    return torch.randn(2**24 + 3, generator=torch.Generator().manual_seed(6))  # a short last int8 block


@pytest.mark.parametrize(
    "spec", ["none", "fp16", "int8", "topk:0.01", "randk:0.01", "topk:0.01+int8", "quant:4", "chunktopk:0.01:4"]
)
def test_large_tensor(spec, large_tensor):
    codec = parse_codec(spec)
    parts = codec.encode(large_tensor, 3)
    decoded = codec.decode(parts, large_tensor.shape, large_tensor.dtype, 3)
    assert decoded.shape == large_tensor.shape and bool(torch.isfinite(decoded).all())
    if spec.startswith(("topk", "randk")):
        assert int((decoded != 0).sum()) == codec.kept(large_tensor.numel())
    elif spec.startswith("chunktopk"):  # 4096 chunks of 4096 and one of 3, keeping 41 each and 1
        assert int((decoded != 0).sum()) == codec.kept_total(large_tensor.numel()) == 4096 * 41 + 1
    elif spec.startswith("quant"):
        assert float((decoded - large_tensor).abs().max()) <= 6 / 16  # |x| < 6: steps of 4 bits are below 0.375
    else:
        assert float((decoded - large_tensor).abs().max()) <= 0.05  # |x| < 6, so int8 steps are below 0.025


# Malformed encodings


def valid_parts(spec: str, numel: int = 1000) -> tuple[dict[str, torch.Tensor], torch.Size]:
    tensor = torch.randn(numel, generator=torch.Generator().manual_seed(8))
    return parse_codec(spec).encode(tensor, 0), tensor.shape


def tampered(spec: str, name: str, change) -> tuple[dict[str, torch.Tensor], torch.Size]:
    parts, shape = valid_parts(spec)
    parts = dict(parts)
    parts[name] = change(parts[name].clone())
    return parts, shape


def set_at(position: int, value):
    def change(part: torch.Tensor) -> torch.Tensor:
        part[position] = value
        return part

    return change


MALFORMED = {
    "index out of range": ("topk:0.01", "indices", set_at(-1, 1000), "outside"),
    "negative index": ("topk:0.01", "indices", set_at(0, -1), "outside"),
    "duplicate index": ("topk:0.01", "indices", lambda p: torch.cat([p[:1], p[:-1]]), "strictly increasing"),
    "unsorted indices": ("topk:0.01", "indices", lambda p: p.flip(0), "strictly increasing"),
    "indices int64": ("topk:0.01", "indices", lambda p: p.long(), "dtype"),
    "too few indices": ("topk:0.01", "indices", lambda p: p[:-1], "shape"),
    "too few values": ("topk:0.01", "values", lambda p: p[:-1], "shape"),
    "too many values": ("none", "values", lambda p: torch.cat([p, p[:1]]), "shape"),
    "values 2-d": ("none", "values", lambda p: p.view(10, 100), "shape"),
    "values float64": ("topk:0.01", "values", lambda p: p.double(), "dtype"),
    "fp16 values as float32": ("fp16", "values", lambda p: p.float(), "dtype"),
    "bf16 values as fp16": ("bf16", "values", lambda p: p.half(), "dtype"),
    "int8 values as uint8": ("int8", "values", lambda p: p.view(torch.uint8), "dtype"),
    "int8 value -128": ("int8", "values", set_at(3, -128), r"\[-127, 127\]"),
    "scales as fp16": ("int8", "scales", lambda p: p.half(), "dtype"),
    "too few scales": ("int8", "scales", lambda p: p[:-1], "shape"),
    "negative scale": ("int8", "scales", set_at(0, -1.0), "non-negative"),
    "nan scale": ("int8", "scales", set_at(0, float("nan")), "finite"),
    "infinite scale": ("int8", "scales", set_at(0, float("inf")), "finite"),
    "composed values wrong count": ("topk:0.01+int8", "kept.values", lambda p: p[:-1], "kept values.*shape"),
    "composed scales wrong dtype": ("randk:0.1+int8", "kept.scales", lambda p: p.double(), "kept values.*dtype"),
    "composed index out of range": ("topk:0.01+fp16", "indices", set_at(0, 5000), "outside"),
    "randk values wrong count": ("randk:0.01", "values", lambda p: torch.cat([p, p]), "shape"),
    "quant values one byte short": ("quant:4", "values", lambda p: p[:-1], "shape"),
    "quant values as int8": ("quant:2", "values", lambda p: p.view(torch.int8), "dtype"),
    "quant one scale too many": ("quant:4:64", "scales", lambda p: torch.cat([p, p[:1]]), "shape"),
    "quant scales as float64": ("quant:8", "scales", lambda p: p.double(), "dtype"),
    "quant negative scale": ("quant:4", "scales", set_at(1, -0.5), "non-negative"),
    "quant nan scale": ("quant:2", "scales", set_at(0, float("nan")), "finite"),
    "chunktopk one scale short": ("chunktopk:0.05:4:64", "scales", lambda p: p[:-1], "shape"),
    "chunktopk one scale too many": ("chunktopk:0.05:4:64", "scales", lambda p: torch.cat([p, p[:1]]), "shape"),
    "chunktopk negative scale": ("chunktopk:0.05:4:64", "scales", set_at(0, -1.0), "non-negative"),
    "chunktopk nan scale": ("chunktopk:0.05:4:64", "scales", set_at(-1, float("nan")), "finite"),
    "chunktopk infinite scale": ("chunktopk:0.05:4:64", "scales", set_at(2, float("inf")), "finite"),
    "chunktopk indices unpacked": ("chunktopk:0.05:4:64", "indices", lambda p: p.int(), "dtype"),
    "chunktopk indices one byte short": ("chunktopk:0.05:4:64", "indices", lambda p: p[:-1], "shape"),
    "chunktopk values as int8": ("chunktopk:0.05:2", "values", lambda p: p.view(torch.int8), "dtype"),
    "chunktopk values one byte too many": ("chunktopk:0.05:2", "values", lambda p: torch.cat([p, p[:1]]), "shape"),
    "composed quant scales wrong count": ("topk:0.01+quant:4", "kept.scales", lambda p: p[:-1], "kept values.*shape"),
}


@pytest.mark.parametrize("case", MALFORMED.values(), ids=MALFORMED.keys())
def test_decode_refuses_malformed_parts(case):
    spec, name, change, message = case
    parts, shape = tampered(spec, name, change)
    with pytest.raises(CodecError, match=message):
        parse_codec(spec).decode(parts, shape, torch.float32, 0)


@pytest.mark.parametrize(
    ("spec", "remove", "add"),
    [
        ("none", "values", None),
        ("fp16", None, "extra"),
        ("int8", "scales", None),
        ("topk:0.01", "indices", None),
        ("topk:0.01", None, "scales"),
        ("randk:0.01", None, "indices"),
        ("topk:0.01+int8", "kept.scales", None),
        ("topk:0.01+int8", None, "values"),
        ("randk:0.1+fp16", None, "kept.scales"),
        ("quant:4", "scales", None),
        ("quant:2", None, "indices"),
        ("chunktopk:0.1:4", "indices", None),
        ("chunktopk:0.1:4", "scales", None),
        ("chunktopk:0.1:4", None, "kept.values"),
    ],
)
def test_decode_refuses_missing_and_unexpected_part_names(spec, remove, add):
    parts, shape = valid_parts(spec)
    parts = dict(parts)
    if remove:
        del parts[remove]
    if add:
        parts[add] = torch.zeros(1)
    with pytest.raises(CodecError, match="parts differ"):
        parse_codec(spec).decode(parts, shape, torch.float32, 0)


def chunktopk_parts(indices: list[int], bits: int, codec, codes: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Parts as a sender could forge them for 20 entries: the given within-chunk indices, every value code 1."""
    codes = codes if codes is not None else [1] * len(indices)
    return {
        "indices": pack_bits(torch.tensor(indices), codec.index_bits),
        "values": pack_bits(torch.tensor(codes), bits),
        "scales": torch.ones(-(-20 // codec.chunk)),
    }


def test_chunktopk_decodes_forged_parts_that_keep_the_rules():
    codec = parse_codec("chunktopk:0.25:4:8")  # 20 entries: chunks of 8, 8 and 4 keep 2, 2 and 1
    # Indices restart at each chunk, so they may fall from one chunk to the next.
    decoded = codec.decode(chunktopk_parts([6, 7, 0, 1, 3], 4, codec), torch.Size([20]), torch.float32, 0)
    assert decoded.nonzero().squeeze(1).tolist() == [6, 7, 8, 9, 19]


@pytest.mark.parametrize(
    ("spec", "indices", "message"),
    [
        # 4 fits in 3 bits, but not in the short last chunk.
        ("chunktopk:0.25:4:8", [0, 1, 2, 3, 4], r"chunk 2 is outside its \[0, 4\)"),
        ("chunktopk:0.25:4:8", [0, 1, 2, 3, 7], r"chunk 2 is outside its \[0, 4\)"),
        ("chunktopk:0.1:4:12", [3, 12, 4], r"chunk 0 is outside its \[0, 12\)"),  # chunks of 12 and 8 keep 2 and 1
        ("chunktopk:0.1:4:12", [3, 15, 4], r"chunk 0 is outside its \[0, 12\)"),  # 4 bits reach 15
        ("chunktopk:0.1:4:12", [3, 11, 8], r"chunk 1 is outside its \[0, 8\)"),
        ("chunktopk:0.25:4:8", [3, 3, 0, 1, 0], "strictly increasing within each chunk"),
        ("chunktopk:0.25:4:8", [0, 1, 5, 2, 0], "strictly increasing within each chunk"),
    ],
)
def test_chunktopk_refuses_indices_out_of_their_chunk_or_not_increasing(spec, indices, message):
    codec = parse_codec(spec)
    with pytest.raises(CodecError, match=message):
        codec.decode(chunktopk_parts(indices, 4, codec), torch.Size([20]), torch.float32, 0)


@pytest.mark.parametrize("name", ["values", "indices"])
def test_chunktopk_refuses_bits_set_past_the_last_code(name):
    codec = parse_codec("chunktopk:0.25:2:8")
    parts = chunktopk_parts([0, 1, 2, 3, 0], 2, codec)  # 5 codes: 10 value bits, 15 index bits
    assert parts["values"].numel() == 2 and parts["indices"].numel() == 2
    codec.decode(parts, torch.Size([20]), torch.float32, 0)
    parts[name] = parts[name].clone()
    parts[name][-1] |= 0x80
    with pytest.raises(CodecError, match=f"part '{name}' has bits set past its last code"):
        codec.decode(parts, torch.Size([20]), torch.float32, 0)


def test_quant_refuses_bits_set_past_the_last_code():
    codec = parse_codec("quant:4")
    parts = dict(codec.encode(torch.randn(5), 0))
    parts["values"] = parts["values"].clone()
    parts["values"][-1] |= 0x10
    with pytest.raises(CodecError, match="past its last code"):
        codec.decode(parts, torch.Size([5]), torch.float32, 0)


@pytest.mark.parametrize(
    ("spec", "other"), [("quant:4:64", 1001), ("chunktopk:0.05:4:64", 1001), ("chunktopk:0.05:4:64", 960)]
)
def test_new_codecs_refuse_parts_meant_for_another_length(spec, other):
    parts, _ = valid_parts(spec, numel=1000)
    with pytest.raises(CodecError, match="shape"):
        parse_codec(spec).decode(parts, torch.Size([other]), torch.float32, 0)


def test_decode_refuses_parts_meant_for_another_shape():
    parts, _ = valid_parts("topk:0.01+int8", numel=1000)
    with pytest.raises(CodecError):
        parse_codec("topk:0.01+int8").decode(parts, torch.Size([2000]), torch.float32, 0)


# Specs


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("none", "none"), ("int8:256", "int8"), ("int8:0064", "int8:64"), ("topk:0.010", "topk:0.01"),
        ("topk:1", "topk:1"), ("topk:1.0", "topk:1"), ("randk:.5", "randk:0.5"), ("topk:1e-3+int8:256", "topk:0.001+int8"),
        ("randk:0.1+bf16", "randk:0.1+bf16"),
        ("quant:4:256", "quant:4"), ("quant:04:0064", "quant:4:64"), ("quant:2:65536", "quant:2:65536"),
        ("chunktopk:0.020:2:4096", "chunktopk:0.02:2"), ("chunktopk:1e-2:8:512", "chunktopk:0.01:8:512"),
        ("chunktopk:1.0:4", "chunktopk:1:4"), ("topk:0.01+quant:4", "topk:0.01+quant:4"),
        ("randk:.1+quant:2:256", "randk:0.1+quant:2"),
    ],
)
def test_specs_have_a_canonical_form(spec, canonical):
    assert parse_codec(spec).spec == canonical
    assert parse_codec(canonical).spec == canonical


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("", "empty part"), ("zstd", "unknown codec 'zstd'"), ("int8+topk:0.1", "only topk or randk"),
        ("topk:0.1+topk:0.2", "after '\\+'"), ("topk:0.1+none", "after '\\+'"), ("topk:0.1+int8+fp16", "at most two"),
        ("topk:0.1+", "empty part"), ("+int8", "empty part"), ("topk", "RATIO ''"), ("topk:abc", "RATIO 'abc'"),
        ("topk:nan", "RATIO 'nan'"), ("randk:inf", "RATIO 'inf'"), ("topk:0", r"outside \(0, 1\]"),
        ("topk:-0.1", "RATIO '-0.1'"), ("randk:1.5", r"outside \(0, 1\]"), ("topk:1e-99999", "RATIO"),
        ("int8:4", r"outside \[8, 65536\]"), ("int8:65537", "outside"), ("int8:x", "BLOCK 'x'"), ("int8:", "BLOCK ''"),
        ("fp16:2", "takes no argument"), ("none:1", "takes no argument"), ("TOPK:0.1", "unknown codec"),
        ("quant:3", "quant BITS 3 is not one of 2, 4, 8"), ("quant:16", "quant BITS 16 is not one of 2, 4, 8"),
        ("quant:0", "not one of 2, 4, 8"), ("quant", r"quant takes BITS\[:CHUNK\], not ''"),
        ("quant:", "quant BITS '' is not an integer"), ("quant:x", "quant BITS 'x'"), ("quant:-4", "BITS '-4'"),
        ("quant:4:4", r"quant CHUNK 4 is outside \[8, 65536\]"), ("quant:4:65537", "outside"),
        ("quant:4:1.5", "quant CHUNK '1.5' is not an integer"), ("quant:4:8:8", r"takes BITS\[:CHUNK\]"),
        ("chunktopk:0.02:5", "chunktopk BITS 5 is not one of 2, 4, 8"), ("chunktopk:0.02:1", "not one of"),
        ("chunktopk:0.02", r"chunktopk takes DENSITY:BITS\[:CHUNK\], not '0.02'"), ("chunktopk", "takes DENSITY"),
        ("chunktopk:0.02:4:64:2", "takes DENSITY"), ("chunktopk:0:4", r"DENSITY 0 is outside \(0, 1\]"),
        ("chunktopk:1.5:4", r"outside \(0, 1\]"), ("chunktopk:nan:4", "DENSITY 'nan'"),
        ("chunktopk:1e-99999:4", "DENSITY"),
        ("chunktopk:0.02:4:4", r"chunktopk CHUNK 4 is outside \[8, 65536\]"), ("chunktopk:0.02:4:70000", "outside"),
        ("chunktopk:0.02:x", "chunktopk BITS 'x'"), ("chunktopk:0.02:4+int8", "only topk or randk"),
        ("topk:0.1+chunktopk:0.1:4", "after '\\+'"), ("topk:0.1+quant:3", "BITS 3"),
        ("quant:4+int8", "only topk or randk"),
    ],
)
def test_bad_specs_name_the_valid_forms_in_one_line(spec, reason):
    with pytest.raises(CodecError, match=reason) as raised:
        parse_codec(spec)
    message = str(raised.value)
    assert "\n" not in message and "Valid: none, fp16, bf16, int8[:BLOCK]" in message and "topk:0.01+int8" in message
    assert "quant:BITS[:CHUNK]" in message and "chunktopk:DENSITY:BITS[:CHUNK]" in message


@pytest.mark.parametrize(
    ("spec", "sparse"),
    [("quant:4", False), ("int8", False), ("chunktopk:0.02:2", True), ("topk:0.01+quant:4", True), ("randk:0.1", True)],
)
def test_codecs_that_keep_a_few_entries_say_they_are_sparse(spec, sparse):
    assert parse_codec(spec).sparse is sparse


def test_ratio_is_exact():
    assert parse_codec("topk:0.07").kept(100) == 7  # 0.07 * 100 is 7.000000000000001 in floats
    assert parse_codec("topk:1e-9").kept(1000) == 1
    assert parse_codec("randk:0.5").kept(0) == 0


# Byte counts


@FAST
@given(st.integers(0, 5000), st.sampled_from([8, 64, 256, 1000, 65536]))
def test_int8_bytes(numel, block):
    parts = parse_codec(f"int8:{block}").encode(torch.randn(numel), 0)
    assert wire_bytes(parts) == numel + math.ceil(numel / block) * 4  # float32 scales


@FAST
@given(st.integers(0, 5000), st.sampled_from([2, 4, 8]), st.sampled_from([8, 64, 256, 1000, 65536]))
def test_quant_bytes(numel, bits, chunk):
    parts = parse_codec(f"quant:{bits}:{chunk}").encode(torch.randn(numel), 0)
    assert parts["values"].numel() == math.ceil(numel * bits / 8)  # bit-packed over the whole vector
    assert wire_bytes(parts) == math.ceil(numel * bits / 8) + math.ceil(numel / chunk) * 4


@FAST
@given(
    st.integers(0, 5000), st.sampled_from([0.01, 0.1, 1.0]), st.sampled_from([2, 4, 8]), st.sampled_from([8, 100, 4096])
)
def test_chunktopk_bytes(numel, density, bits, chunk):
    codec = parse_codec(f"chunktopk:{density}:{bits}:{chunk}")
    lengths = chunk_lengths(numel, chunk)
    kept = sum(max(1, math.ceil(Fraction(str(density)) * length)) for length in lengths)
    parts = codec.encode(torch.randn(numel), 0)
    index_bits = math.ceil(math.log2(chunk))
    assert codec.index_bits == index_bits and codec.kept_total(numel) == kept
    assert wire_bytes(parts) == math.ceil(kept * index_bits / 8) + math.ceil(kept * bits / 8) + len(lengths) * 4


def test_chunktopk_over_a_million_entries_is_over_100_times_smaller_than_float32():
    parts = parse_codec("chunktopk:0.02:2").encode(torch.randn(2**20, generator=torch.Generator().manual_seed(9)), 0)
    kept = 256 * 82  # 256 chunks of 4096, each keeping ceil(0.02 * 4096) = 82
    assert parts["indices"].numel() == kept * 12 // 8 == 31_488  # 12 bits an index
    assert parts["values"].numel() == kept * 2 // 8 == 5_248
    assert parts["scales"].numel() * 4 == 1_024
    assert wire_bytes(parts) == 37_760
    assert 4 * 2**20 / wire_bytes(parts) >= 100  # 111.1


def test_sparse_and_cast_bytes_over_a_million_floats():
    tensor = torch.randn(1_000_000)
    k = 10_000

    def size(spec: str) -> int:
        return wire_bytes(parse_codec(spec).encode(tensor, 0))

    assert size("none") == 4 * 1_000_000
    assert size("fp16") == size("bf16") == 2 * 1_000_000
    assert size("topk:0.01") == k * (4 + 4)  # float32 values, int32 indices
    assert size("randk:0.01") == k * 4  # values only
    assert size("topk:0.01+int8") == k * 4 + k + math.ceil(k / 256) * 4
    assert size("randk:0.01+fp16") == k * 2
    assert size("topk:0.01+quant:4") == k * 4 + k // 2 + math.ceil(k / 256) * 4
    assert size("quant:8") == 1_000_000 + math.ceil(1_000_000 / 256) * 4
    assert size("quant:2:1000") == 250_000 + 1000 * 4


# Bit packing


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_bits_round_trips_codes_of_every_width_and_takes_exactly_the_bits_it_needs(bits):
    generator = torch.Generator().manual_seed(bits)
    for count in (0, 1, 7, 8, 9, 1001):
        codes = torch.randint(0, 2**bits, (count,), generator=generator)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8
        assert packed.numel() == packed_bytes(count, bits) == math.ceil(count * bits / 8)
        assert torch.equal(unpack_bits(packed, bits, count).long(), codes)


def test_pack_bits_lays_codes_out_least_significant_bit_first():
    assert pack_bits(torch.tensor([0xABC, 0x123]), 12).tolist() == [0xBC, 0x3A, 0x12]
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0b1101, 1]
    assert pack_bits(torch.tensor([0b101, 0b011, 0b111]), 3).tolist() == [0b11_011_101, 0b1]
    assert unpack_bits(torch.tensor([0xBC, 0x3A, 0x12], dtype=torch.uint8), 12, 2).tolist() == [0xABC, 0x123]


def test_pack_bits_takes_widths_from_1_to_16_only():
    for bits in (0, 17):
        with pytest.raises(ValueError, match="1 to 16 bits"):
            pack_bits(torch.zeros(3, dtype=torch.int64), bits)
        with pytest.raises(ValueError, match="1 to 16 bits"):
            unpack_bits(torch.zeros(3, dtype=torch.uint8), bits, 1)


@pytest.mark.parametrize("device", DEVICES)
def test_pack_bits_gives_the_same_bytes_on_every_device_here(device):
    codes = torch.randint(0, 2**12, (1000,), generator=torch.Generator().manual_seed(1))
    packed = pack_bits(codes.to(device), 12)
    assert packed.device.type == device and torch.equal(packed.cpu(), pack_bits(codes, 12))
    assert torch.equal(unpack_bits(packed, 12, 1000).cpu().long(), codes)
