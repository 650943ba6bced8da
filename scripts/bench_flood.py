"""A flood of junk streams against a peer that gossips with an honest neighbour: how much of the
honest gossip still gets through, and how much of the junk reaches the transport at all.

Three peers on loopback. A victim and its honest neighbour run plain gossip steps (a ring of
two, a small model) in this process, one step after another, first for --quiet seconds alone,
then while an attacker, in its own process, opens streams to the victim as fast as --openers
concurrent tasks can for --seconds, each carrying a few bytes of junk. Prints JSON: per phase,
the steps each honest peer completed and the neighbour models it heard and missed, and the CPU
seconds the victim's process spent; the junk streams the attacker opened (and those whose open
or write failed, which a victim that closes them at once causes), and how the victim's transport
refused them. All processes share this host's cores, so the attacker's own work slows the
honest pair too; the victim's CPU is the part that the victim's code decides.

With --hold, the attacker instead holds the victim's budget of buffered bytes: three identities
keep 8 streams each open, each announcing the largest payload the victim accepts and sending
all of it but its last byte; a stream the victim closes is opened again a second later. The
"flood" phase is then the time they hold. The victim's payload deadlines are capped at the
exchange's timeout, as a peer's are. --shared-budget gives the victim the rule from before
shares per sender, for comparison: one budget for all senders that 16 stalled payloads fill,
and payload deadlines that follow the payload's size only.

    python scripts/bench_flood.py [--seconds 10] [--quiet 5] [--openers 64]
    python scripts/bench_flood.py --hold [--shared-budget] [--seconds 20] [--quiet 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import multiprocessing as mp
import time

import hivemind
import torch
from hivemind.p2p import P2PDaemonError, PeerID

from gossip.exchange import NeighbourExchange
from gossip.message import HEADER_LENGTH_PREFIX, Message
from gossip.neighbourhood import GraphNeighbourhood
from gossip.wire import Limits, encode
from peer.net.clock import WallClock
from peer.net.stream_limits import ByteBudget
from peer.net.transport import PROTOCOL, P2PTransport
from topology import parse_topology

MODEL_ELEMENTS = 5_000  # 20 KB of float32
LIMITS = Limits(max_payload_bytes=MODEL_ELEMENTS * 4 + (1 << 20))  # a model and the slack a peer allows
JUNK = (8).to_bytes(4, "big") + b"\xc1" * 8  # a header that is not msgpack
STEP_TIMEOUT = 5.0
HOLDERS = 3  # identities of the attacker that holds payloads
STREAMS_PER_HOLDER = 8  # the victim's cap on one peer's open streams
REOPEN_PAUSE = 1.0  # seconds before a holder opens again a stream the victim closed


async def flood(initial_peers: list[str], victim: str, seconds: float, openers: int, connection) -> None:
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial_peers)
    p2p = await dht.replicate_p2p()
    target = PeerID.from_base58(victim)
    connection.send("ready")
    await asyncio.get_running_loop().run_in_executor(None, connection.recv)  # the go signal
    opened = failed = 0
    deadline = time.monotonic() + seconds

    async def opener() -> None:
        nonlocal opened, failed
        while time.monotonic() < deadline:
            try:
                _, _, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(target, PROTOCOL), 5)
                writer.write(JUNK)
                await writer.drain()
                writer.close()
                opened += 1
            except (P2PDaemonError, ConnectionError, OSError, TimeoutError):  # refused or reset: part of the measure
                failed += 1

    await asyncio.gather(*(opener() for _ in range(openers)))
    connection.send({"opened": opened, "failed": failed})
    dht.shutdown()


def attacker_process(initial_peers: list[str], victim: str, seconds: float, openers: int, connection) -> None:
    logging.disable(logging.CRITICAL)
    asyncio.run(flood(initial_peers, victim, seconds, openers, connection))


def largest_message(sender: str) -> bytes:
    """A valid message with the largest payload the victim accepts, on the wire."""
    model = {"x": torch.zeros(LIMITS.max_payload_bytes // 4)}
    return b"".join(bytes(frame) for frame in encode(Message("model", sender, 0, model)))


async def hold(initial_peers: list[str], victim: str, seconds: float, connection) -> None:
    dhts = [
        hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial_peers)
        for _ in range(HOLDERS)
    ]
    p2ps = [await dht.replicate_p2p() for dht in dhts]
    target = PeerID.from_base58(victim)
    connection.send("ready")
    await asyncio.get_running_loop().run_in_executor(None, connection.recv)  # the go signal
    opened = failed = 0
    deadline = time.monotonic() + seconds

    async def holder(p2p, data: bytes) -> None:
        """Keep one stream stalled on the victim until the deadline, opening it again when closed."""
        nonlocal opened, failed
        while time.monotonic() < deadline:
            try:
                _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(target, PROTOCOL), 5)
            except (P2PDaemonError, ConnectionError, OSError, TimeoutError):
                failed += 1
                continue
            opened += 1
            try:
                writer.write(data)
                await writer.drain()
                async with asyncio.timeout(deadline - time.monotonic()):
                    await reader.read()  # nothing comes; it returns once the victim closes the stream
            except (ConnectionError, OSError, TimeoutError):
                pass
            finally:
                writer.close()
            await asyncio.sleep(REOPEN_PAUSE)

    await asyncio.gather(*(
        holder(p2p, largest_message(p2p.peer_id.to_base58())[:-1]) for p2p in p2ps for _ in range(STREAMS_PER_HOLDER)
    ))
    connection.send({"opened": opened, "failed": failed})
    for dht in dhts:
        dht.shutdown()


def holder_process(initial_peers: list[str], victim: str, seconds: float, connection) -> None:
    logging.disable(logging.CRITICAL)
    asyncio.run(hold(initial_peers, victim, seconds, connection))


async def gossip(exchange: NeighbourExchange, state: dict, until: float) -> list[tuple[float, int, int]]:
    """Step after step until the wall-clock time ``until``: (when it ended, models heard, missed) per step."""
    steps = []
    while time.time() < until:
        result = await exchange.step(len(steps), state)
        state = result.state
        steps.append((time.time(), result.heard, len(result.missing)))
    return steps


async def start_peer(initial_peers: list[str], shared_budget: bool = False) -> tuple[hivemind.DHT, P2PTransport]:
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial_peers)
    # The payload deadline of a peer whose exchange waits STEP_TIMEOUT for a neighbour's model.
    transport = P2PTransport(
        await dht.replicate_p2p(), LIMITS, exchange_timeout=math.inf if shared_budget else STEP_TIMEOUT
    )
    if shared_budget:
        # 16 stalled messages fill it exactly, as 16 stalled payloads filled the payload budget then
        # (headers were not counted); an attacker's peer id is as long as ours.
        stalled = len(largest_message(transport.peer_id)) - HEADER_LENGTH_PREFIX
        capacity = transport.stream_limits.buffered_messages * stalled
        transport.buffered = ByteBudget(capacity, share=capacity)
    await transport.start()
    return dht, transport


def exchange_between(transport: P2PTransport, ids: list[str]) -> NeighbourExchange:
    neighbourhood = GraphNeighbourhood(parse_topology("ring", 2), ids, transport.peer_id)
    reference = {"x": torch.zeros(MODEL_ELEMENTS)}
    return NeighbourExchange(transport, WallClock(), neighbourhood, reference, timeout=STEP_TIMEOUT)


async def neighbour(initial_peers: list[str], connection) -> None:
    dht, transport = await start_peer(initial_peers)
    connection.send(transport.peer_id)
    ids, until = await asyncio.get_running_loop().run_in_executor(None, connection.recv)
    connection.send(await gossip(exchange_between(transport, ids), {"x": torch.ones(MODEL_ELEMENTS)}, until))
    await transport.stop()
    dht.shutdown()


def neighbour_process(initial_peers: list[str], connection) -> None:
    logging.disable(logging.CRITICAL)
    asyncio.run(neighbour(initial_peers, connection))


def phases(steps: list[tuple[float, int, int]], flood_start: float, flood_end: float, until: float) -> dict:
    """Steps by the phase they ended in. A step that ended after ``until`` is left out: it waited
    for a neighbour that had stopped, a miss of the benchmark's own making."""
    def summary(start: float, end: float) -> dict:
        inside = [(heard, missed) for ended, heard, missed in steps if start <= ended < end]
        return {"steps": len(inside), "heard": sum(h for h, _ in inside), "missed": sum(m for _, m in inside)}

    return {"quiet": summary(0, flood_start), "flood": summary(flood_start, flood_end), "after": summary(flood_end, until)}


async def main(seconds: float, quiet: float, openers: int, holding: bool, shared_budget: bool) -> dict:
    dht, transport = await start_peer([], shared_budget)
    maddrs = [str(a) for a in dht.get_visible_maddrs()]
    spawn = mp.get_context("spawn")
    to_neighbour, neighbour_end = mp.Pipe()
    to_attacker, attacker_end = mp.Pipe()
    if holding:
        attacker = spawn.Process(target=holder_process, args=(maddrs, transport.peer_id, seconds, attacker_end))
    else:
        attacker = spawn.Process(target=attacker_process, args=(maddrs, transport.peer_id, seconds, openers, attacker_end))
    processes = [spawn.Process(target=neighbour_process, args=(maddrs, neighbour_end)), attacker]
    loop = asyncio.get_running_loop()
    try:
        for process in processes:
            process.start()
        ids = [transport.peer_id, await loop.run_in_executor(None, to_neighbour.recv)]
        assert await loop.run_in_executor(None, to_attacker.recv) == "ready"
        flood_start = time.time() + quiet
        flood_end = flood_start + seconds
        until = flood_end + 2 * STEP_TIMEOUT  # long enough to see whether the pair is back in step
        to_neighbour.send((ids, until))
        cpu_start = time.process_time()
        victim = asyncio.ensure_future(gossip(exchange_between(transport, ids), {"x": torch.zeros(MODEL_ELEMENTS)}, until))
        await asyncio.sleep(flood_start - time.time())
        to_attacker.send("go")
        cpu_flood_start = time.process_time()
        streams = await loop.run_in_executor(None, to_attacker.recv)
        cpu = {"quiet": cpu_flood_start - cpu_start, "flood": time.process_time() - cpu_flood_start}
        steps = {"victim": await victim, "neighbour": await loop.run_in_executor(None, to_neighbour.recv)}
        await transport.stop()
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
        dht.shutdown()
    if holding:
        attack = {
            "benchmark": "payload_hold", "shared_budget": shared_budget,
            "holders": HOLDERS, "streams_per_holder": STREAMS_PER_HOLDER, "payload_bytes": LIMITS.max_payload_bytes,
            "stalled_streams_opened": streams["opened"], "stalled_stream_opens_failed": streams["failed"],
            "victim_buffered_peak_bytes": transport.buffered.peak,
        }
    else:
        attack = {
            "benchmark": "junk_flood", "openers": openers,
            "junk_streams_opened": streams["opened"], "junk_stream_opens_failed": streams["failed"],
        }
    return {
        **attack,
        "flood_seconds": seconds, "step_timeout": STEP_TIMEOUT,
        **{peer: phases(record, flood_start, flood_end, until) for peer, record in steps.items()},
        "victim_cpu_seconds": {phase: round(seconds, 2) for phase, seconds in cpu.items()},
        "victim_rejections": dict(transport.counters.rejections),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--quiet", type=float, default=5.0)
    parser.add_argument("--openers", type=int, default=64)
    parser.add_argument("--hold", action="store_true", help="hold the victim's buffered bytes instead of flooding it")
    parser.add_argument("--shared-budget", action="store_true", help="the victim's budget as before shares per sender")
    args = parser.parse_args()
    result = asyncio.run(main(args.seconds, args.quiet, args.openers, args.hold, args.shared_budget))
    print(json.dumps(result, indent=2))
