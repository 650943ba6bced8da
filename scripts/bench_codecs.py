"""Speed and compression of the codecs over a model-sized set of tensors, on CPU and on CUDA.

Times encode and decode of every tensor (each with its own seed, as a peer would send them),
after one untimed pass. Prints JSON; GB/s are 1e9 bytes of the original float32 data per
second, medians over the repeats; the ratio is original bytes / wire bytes, and bytes per
parameter are wire bytes / parameters. Target: every codec over 25M parameters in well under a
second on CPU. An outer optimizer sends its pseudo-gradient as one flat vector: measure that with
``--tensors 1 --elements 25000000``.

    python scripts/bench_codecs.py [--repeats 3] [--tensors 25] [--elements 1000000] [--specs int8,quant:4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from gossip.codecs import Codec, parse_codec, wire_bytes

SPECS = [
    "none", "fp16", "bf16", "int8", "quant:8", "quant:4", "quant:2",
    "topk:0.01", "randk:0.01", "topk:0.01+int8", "topk:0.01+quant:4", "chunktopk:0.02:2", "chunktopk:0.01:4",
]


def seconds(work: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def measure(codec: Codec, tensors: list[torch.Tensor], repeats: int) -> dict[str, float]:
    device = tensors[0].device
    original = sum(t.numel() * t.element_size() for t in tensors)
    parameters = sum(t.numel() for t in tensors)

    def encode_all() -> list[dict[str, torch.Tensor]]:
        return [codec.encode(tensor, seed) for seed, tensor in enumerate(tensors)]

    encoded = encode_all()

    def decode_all() -> None:
        for seed, (parts, tensor) in enumerate(zip(encoded, tensors)):
            codec.decode(parts, tensor.shape, tensor.dtype, seed)

    decode_all()
    encoding, decoding = [], []
    for _ in range(repeats):  # interleaved, so that drift in machine load hits both alike
        encoding.append(seconds(encode_all, device))
        decoding.append(seconds(decode_all, device))
    encode_s, decode_s = statistics.median(encoding), statistics.median(decoding)
    return {
        "encode_s": round(encode_s, 4),
        "decode_s": round(decode_s, 4),
        "encode_plus_decode_s": round(encode_s + decode_s, 4),
        "encode_gbps": round(original / encode_s / 1e9, 2),
        "decode_gbps": round(original / decode_s / 1e9, 2),
        "compression_ratio": round(original / sum(wire_bytes(parts) for parts in encoded), 2),
        "bytes_per_parameter": round(sum(wire_bytes(parts) for parts in encoded) / parameters, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tensors", type=int, default=25)
    parser.add_argument("--elements", type=int, default=1_000_000, help="float32 elements per tensor")
    parser.add_argument("--specs", default=",".join(SPECS), help="comma-separated codec specs")
    args = parser.parse_args()
    specs = args.specs.split(",")

    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(args.elements, generator=generator) for _ in range(args.tensors)]
    report: dict[str, object] = {
        "parameters": args.tensors * args.elements,
        "tensors": args.tensors,
        "repeats": args.repeats,
        "cpu": {spec: measure(parse_codec(spec), tensors, args.repeats) for spec in specs},
        "cuda": "not available",
    }
    if torch.cuda.is_available():
        on_gpu = [tensor.cuda() for tensor in tensors]
        report["cuda"] = {spec: measure(parse_codec(spec), on_gpu, args.repeats) for spec in specs}
        report["gpu"] = torch.cuda.get_device_name()
    report |= {
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
