"""Compression codecs: round trips, error bounds, contraction, determinism, byte counts, and a
precise refusal of every malformed encoding and bad spec."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.codecs import CodecError, parse_codec, wire_bytes
from gossip.message import Message
from gossip.wire import Limits
from gossip.wire import decode as wire_decode
from gossip.wire import encode as wire_encode

SPECS = [
    "none", "fp16", "bf16", "int8", "int8:8",
    "topk:0.01", "topk:0.3", "randk:0.01", "randk:0.3",
    "topk:0.01+int8", "topk:0.05+bf16", "topk:0.2+int8:16", "randk:0.1+fp16", "randk:0.5+int8",
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
    for spec in ("fp16", "int8", "topk:0.5", "randk:0.5+int8"):
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


@pytest.mark.parametrize("spec", ["none", "fp16", "int8", "topk:0.01", "randk:0.01", "topk:0.01+int8"])
def test_large_tensor(spec, large_tensor):
    codec = parse_codec(spec)
    parts = codec.encode(large_tensor, 3)
    decoded = codec.decode(parts, large_tensor.shape, large_tensor.dtype, 3)
    assert decoded.shape == large_tensor.shape and bool(torch.isfinite(decoded).all())
    if spec.startswith(("topk", "randk")):
        assert int((decoded != 0).sum()) == codec.kept(large_tensor.numel())
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
    ],
)
def test_bad_specs_name_the_valid_forms_in_one_line(spec, reason):
    with pytest.raises(CodecError, match=reason) as raised:
        parse_codec(spec)
    message = str(raised.value)
    assert "\n" not in message and "Valid: none, fp16, bf16, int8[:BLOCK]" in message and "topk:0.01+int8" in message


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
