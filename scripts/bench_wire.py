"""Throughput of the wire format on a model-sized message, in memory, against a plain memcpy.

Times encode() (frames only: joining them would be a copy the network path never makes),
decode() of the assembled bytes, read_message() from a StreamReader already fed the whole
message in 1 MiB chunks (a fast sender: the payload's buffer is allocated at once), and
read_message() while the message arrives in 64 KiB pieces, as a network delivers it (the
payload's buffer is allocated when its first piece arrives, and the OS backs its pages as they
are written). A torch clone of the same bytes in the same run is the memcpy baseline.
Prints JSON; GB/s are 1e9 bytes per second, medians over the repeats. Target: encode + decode
at >= 1 GB/s.

    python scripts/bench_wire.py [--repeats 5] [--tensors 25] [--elements 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from gossip.message import Message
from gossip.wire import Limits, decode, encode, read_message

FEED_CHUNK = 1 << 20
STREAM_CHUNK = 1 << 16  # what a socket read typically hands asyncio


def seconds(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


async def timed_read(data: bytes, limits: Limits) -> tuple[float, Message]:
    reader = asyncio.StreamReader()
    for start in range(0, len(data), FEED_CHUNK):  # what the network would have delivered
        reader.feed_data(data[start : start + FEED_CHUNK])
    reader.feed_eof()
    started = time.perf_counter()
    message = await read_message(reader, limits)
    return time.perf_counter() - started, message


async def timed_streamed_read(data: bytes, limits: Limits) -> tuple[float, Message]:
    reader = asyncio.StreamReader()
    pieces = memoryview(data)

    async def arrive() -> None:
        for start in range(0, len(data), STREAM_CHUNK):
            reader.feed_data(pieces[start : start + STREAM_CHUNK])
            await asyncio.sleep(0)  # the reader takes each piece before the next arrives
        reader.feed_eof()

    started = time.perf_counter()
    arriving = asyncio.ensure_future(arrive())
    message = await read_message(reader, limits)
    await arriving
    return time.perf_counter() - started, message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tensors", type=int, default=25)
    parser.add_argument("--elements", type=int, default=1_000_000, help="float32 elements per tensor")
    args = parser.parse_args()

    tensors = {f"layer{i}.weight": torch.randn(args.elements) for i in range(args.tensors)}
    message = Message("state", "bench", 1, tensors, {"loss": 0.5, "steps": 10})
    payload = message.payload_size()
    limits = Limits(max_payload_bytes=payload)
    data = b"".join(encode(message))
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)

    received = decode(data, limits)
    assert all(torch.equal(received.tensors[name], tensor) for name, tensor in tensors.items())

    encoding, decoding, reading, streaming, copying = [], [], [], [], []
    with asyncio.Runner() as runner:
        for _ in range(args.repeats):  # interleaved, so that drift in machine load hits all alike
            encoding.append(seconds(lambda: encode(message)))
            decoding.append(seconds(lambda: decode(data, limits)))
            elapsed, read_back = runner.run(timed_read(data, limits))
            reading.append(elapsed)
            del read_back  # free its 100 MB before the next repeat
            elapsed, read_back = runner.run(timed_streamed_read(data, limits))
            streaming.append(elapsed)
            del read_back
            copying.append(seconds(raw.clone))

    def rate(times: list[float]) -> float:
        return payload / statistics.median(times) / 1e9

    encode_s, decode_s, read_s = map(statistics.median, (encoding, decoding, reading))
    print(json.dumps({
        "payload_bytes": payload,
        "wire_bytes": len(data),
        "tensors": args.tensors,
        "repeats": args.repeats,
        "encode_gbps": round(rate(encoding), 2),
        "decode_gbps": round(rate(decoding), 2),
        "read_message_gbps": round(rate(reading), 2),
        "read_message_streamed_gbps": round(rate(streaming), 2),
        "memcpy_gbps": round(rate(copying), 2),
        "encode_plus_decode_gbps": round(payload / (encode_s + decode_s) / 1e9, 2),
        "encode_plus_read_message_gbps": round(payload / (encode_s + read_s) / 1e9, 2),
        "read_message_vs_memcpy": round(rate(reading) / rate(copying), 3),
        "target_gbps": 1.0,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
