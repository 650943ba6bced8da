"""Model exchange over libp2p on loopback: our transport (wire encoding, validation, decoding)
against a raw P2P stream carrying the same number of bytes, side by side in one run.

The receiver runs in its own process, as a neighbour would; the sender times each transfer
until the receiver acknowledges that it has the whole message (for our transport: decoded and
validated). Prints JSON. The target is a ratio of at least 0.8.

    python scripts/bench_transport.py [--megabytes 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import platform
import statistics
import time

import hivemind
import torch
from hivemind.p2p import PeerID

from gossip.message import Message
from gossip.wire import Limits
from peer.net.transport import P2PTransport

RAW_PROTOCOL = "bench-raw"
CHUNK = 1 << 20
ACK = b"k"


def limits_for(megabytes: int) -> Limits:
    return Limits(max_payload_bytes=megabytes * 1_000_000 + (1 << 20))


async def serve(initial_peers: list[str], megabytes: int, connection) -> None:
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial_peers)
    p2p = await dht.replicate_p2p()

    async def raw(info, reader, writer):
        remaining = int.from_bytes(await reader.readexactly(8), "big")
        while remaining:
            remaining -= len(await reader.read(min(remaining, CHUNK)))
        writer.write(ACK)
        await writer.drain()
        writer.close()

    async def on_model(message: Message) -> Message:
        return Message("ack", transport.peer_id, message.round)

    await p2p.add_binary_stream_handler(RAW_PROTOCOL, raw)
    transport = P2PTransport(p2p, limits_for(megabytes))
    transport.serve("model", on_model)
    await transport.start()
    connection.send(transport.peer_id)
    await asyncio.get_running_loop().run_in_executor(None, connection.recv)  # until told to stop
    dht.shutdown()


def receiver_process(initial_peers: list[str], megabytes: int, connection) -> None:
    asyncio.run(serve(initial_peers, megabytes, connection))


async def raw_seconds(p2p, peer_id, size: int) -> float:
    payload = memoryview(bytes(size))
    started = time.perf_counter()
    _, reader, writer = await p2p.call_binary_stream_handler(peer_id, RAW_PROTOCOL)
    writer.write(size.to_bytes(8, "big"))
    for offset in range(0, size, CHUNK):
        writer.write(payload[offset : offset + CHUNK])
        await writer.drain()
    if await reader.read(1) != ACK:
        raise RuntimeError("the receiver did not acknowledge the raw transfer")
    elapsed = time.perf_counter() - started
    writer.close()
    return elapsed


async def transport_seconds(transport: P2PTransport, peer: str, message: Message) -> float:
    started = time.perf_counter()
    await transport.request(peer, message, timeout=120)
    return time.perf_counter() - started


async def main(megabytes: int, repeats: int) -> dict:
    tensors = {f"layer{i}": torch.randn(megabytes * 250_000 // 25) for i in range(25)}
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    ours_end, theirs_end = mp.Pipe()
    receiver = mp.get_context("spawn").Process(
        target=receiver_process, args=([str(a) for a in dht.get_visible_maddrs()], megabytes, theirs_end)
    )
    receiver.start()
    try:
        p2p = await dht.replicate_p2p()
        sender = P2PTransport(p2p, limits_for(megabytes))
        peer = await asyncio.get_running_loop().run_in_executor(None, ours_end.recv)
        message = Message("model", sender.peer_id, 0, tensors)
        size = message.wire_size()
        peer_id = PeerID.from_base58(peer)
        await raw_seconds(p2p, peer_id, size)  # warm up the connection
        raw, ours = [], []
        for _ in range(repeats):  # interleaved, so that drift in machine load hits both alike
            raw.append(await raw_seconds(p2p, peer_id, size))
            ours.append(await transport_seconds(sender, peer, message))
    finally:
        ours_end.send("stop")
        receiver.join(timeout=30)
        if receiver.is_alive():
            receiver.kill()
        dht.shutdown()
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
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.megabytes, args.repeats)), indent=2))
