"""Model exchange over libp2p on loopback: our transport (wire encoding, validation, decoding)
against a raw P2P stream carrying the same number of bytes, side by side in one run.

Prints JSON. The target is a ratio of at least 0.8.

    python scripts/bench_transport.py [--megabytes 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time

import hivemind
import torch

from gossip.message import Message
from gossip.wire import Limits
from peer.net.transport import P2PTransport

RAW_PROTOCOL = "bench-raw"
CHUNK = 1 << 20


async def raw_stream_seconds(sender, receiver, size: int) -> float:
    done = asyncio.Event()

    async def drain(info, reader, writer):
        received = 0
        while chunk := await reader.read(CHUNK):
            received += len(chunk)
        writer.close()
        if received == size:
            done.set()

    await receiver.add_binary_stream_handler(RAW_PROTOCOL, drain)
    payload = memoryview(bytes(size))
    started = time.perf_counter()
    _, _, writer = await sender.call_binary_stream_handler(receiver.peer_id, RAW_PROTOCOL)
    for offset in range(0, size, CHUNK):
        writer.write(payload[offset : offset + CHUNK])
        await writer.drain()
    writer.close()
    await done.wait()
    elapsed = time.perf_counter() - started
    await receiver.remove_binary_stream_handler(RAW_PROTOCOL)
    return elapsed


async def transport_seconds(sender: P2PTransport, receiver: P2PTransport, message: Message) -> float:
    done = asyncio.Event()

    async def on_model(received: Message) -> None:
        done.set()

    receiver.serve("model", on_model)
    started = time.perf_counter()
    await sender.send(receiver.peer_id, message)
    await done.wait()
    return time.perf_counter() - started


async def main(megabytes: int, repeats: int) -> dict:
    tensors = {f"layer{i}": torch.randn(megabytes * 250_000 // 25) for i in range(25)}
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    second = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first.get_visible_maddrs())
    try:
        p2p_a, p2p_b = await first.replicate_p2p(), await second.replicate_p2p()
        limits = Limits(max_payload_bytes=payload + (1 << 20))
        sender, receiver = P2PTransport(p2p_a, limits), P2PTransport(p2p_b, limits)
        await receiver.start()
        message = Message("model", sender.peer_id, 0, tensors)
        size = message.wire_size()
        raw, ours = [], []
        for _ in range(repeats):  # interleaved, so that drift in machine load hits both alike
            raw.append(await raw_stream_seconds(p2p_a, p2p_b, size))
            ours.append(await transport_seconds(sender, receiver, message))
        await receiver.stop()
    finally:
        first.shutdown()
        second.shutdown()
    raw_rate = [size / s / 1e6 for s in raw]
    our_rate = [size / s / 1e6 for s in ours]
    ratios = [o / r for o, r in zip(our_rate, raw_rate)]
    return {
        "benchmark": "transport_loopback",
        "bytes": size, "tensors": len(tensors), "repeats": repeats,
        "raw_stream_mb_per_s": raw_rate, "transport_mb_per_s": our_rate,
        "ratio_per_repeat": ratios, "ratio_median": statistics.median(ratios), "target_ratio_min": 0.8,
        "machine": platform.machine(), "torch": torch.__version__,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.megabytes, args.repeats)), indent=2))
