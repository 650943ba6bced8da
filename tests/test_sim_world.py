"""The simulated world: virtual time, link delays, loss and crashes. Shared links: tests/test_links.py."""

import asyncio
import time

import pytest
import torch

from gossip.message import Message
from peer.sim import LinkModel, SimClock, SimNetwork, SimulationDeadlock, SpeedProfile, VirtualTimeLoop


def run(coro):
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coro)


def test_virtual_sleep_advances_virtual_time_only():
    async def main():
        loop = asyncio.get_running_loop()
        start_wall = time.monotonic()
        await asyncio.sleep(3600)
        return loop.time(), time.monotonic() - start_wall

    virtual, wall = run(main())
    assert virtual == pytest.approx(3600)
    assert wall < 3600  # an hour of simulated waiting did not happen in real time


def test_timeouts_fire_in_virtual_time():
    async def main():
        never = asyncio.get_running_loop().create_future()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(30):
                await never
        return asyncio.get_running_loop().time()

    assert run(main()) == pytest.approx(30)


def test_a_wait_that_nothing_can_end_is_reported_as_deadlock():
    async def main():
        await asyncio.get_running_loop().create_future()

    with pytest.raises(SimulationDeadlock):
        run(main())


def test_interleaving_is_deterministic():
    def trace():
        events = []

        async def worker(name, delays):
            for d in delays:
                await asyncio.sleep(d)
                events.append((name, asyncio.get_running_loop().time()))

        async def main():
            await asyncio.gather(worker("a", [0.3, 0.1, 0.2]), worker("b", [0.1, 0.1, 0.4]), worker("c", [0.2, 0.2]))

        run(main())
        return events

    assert trace() == trace()


def test_compute_charges_the_speed_profile():
    clock = SimClock(SpeedProfile(seconds_per_step=0.5))

    async def main():
        result = await clock.compute(lambda a, b: a + b, 2, 3, steps=4)
        return result, clock.now()

    assert run(main()) == (5, pytest.approx(2.0))


def _message(size_bytes: int) -> Message:
    return Message("data", "a", 0, {"x": torch.zeros(size_bytes, dtype=torch.uint8)})


def test_arrival_time_is_latency_plus_transmission_and_a_senders_messages_serialise():
    network = SimNetwork(LinkModel(latency=0.05), bandwidth=1000.0)
    a, b = network.attach("a"), network.attach("b")
    arrivals = []

    async def on_data(message):
        arrivals.append(asyncio.get_running_loop().time())

    b.serve("data", on_data)
    message = _message(1000)
    size = message.wire_size()

    async def main():
        await a.send("b", message)
        await a.send("b", message)  # queued behind the first on a's uplink
        await asyncio.sleep(10)

    run(main())
    assert arrivals == [pytest.approx(size / 1000 + 0.05), pytest.approx(2 * size / 1000 + 0.05)]
    assert a.counters.bytes_sent == 2 * size
    assert b.counters.bytes_received == 2 * size
    assert a.network.bytes_sent() == 2 * size  # the whole network's, for a run's records


def test_request_gets_the_handlers_reply():
    network = SimNetwork(LinkModel(latency=0.1), bandwidth=1e9)
    a, b = network.attach("a"), network.attach("b")

    async def echo(message):
        return Message("reply", "b", message.round, {"y": message.tensors["x"] * 2})

    b.serve("data", echo)

    async def main():
        reply = await a.request("b", Message("data", "a", 7, {"x": torch.ones(3)}), timeout=5)
        return reply, asyncio.get_running_loop().time()

    reply, now = run(main())
    assert reply.round == 7 and torch.equal(reply.tensors["y"], torch.full((3,), 2.0))
    assert now == pytest.approx(0.2, abs=1e-3)


def test_lost_messages_are_never_delivered_and_requests_time_out():
    network = SimNetwork(LinkModel(loss=1.0))
    a, b = network.attach("a"), network.attach("b")
    b.serve("data", lambda m: asyncio.sleep(0))

    async def main():
        with pytest.raises(TimeoutError):
            await a.request("b", _message(10), timeout=3)

    run(main())
    assert b.counters.messages_received == 0
    assert a.counters.messages_sent == 1


def test_loss_is_reproducible_for_a_seed():
    def delivered(seed):
        network = SimNetwork(LinkModel(loss=0.5), seed=seed)
        a, b = network.attach("a"), network.attach("b")
        got = []

        async def on_data(message):
            got.append(message.round)

        b.serve("data", on_data)

        async def main():
            for i in range(50):
                await a.send("b", Message("data", "a", i))
            await asyncio.sleep(5)

        run(main())
        return got

    assert delivered(1) == delivered(1)
    assert delivered(1) != delivered(2)
    assert 10 < len(delivered(1)) < 40


def test_a_crashed_peer_receives_nothing():
    network = SimNetwork()
    a, b = network.attach("a"), network.attach("b")
    b.serve("data", lambda m: asyncio.sleep(0))
    network.crash("b")

    async def main():
        await a.send("b", _message(10))
        await asyncio.sleep(1)

    run(main())
    assert b.counters.messages_received == 0
    assert a.reachable() == []


def test_link_model_rejects_nonsense():
    with pytest.raises(ValueError, match="loss"):
        LinkModel(loss=1.5)
    with pytest.raises(ValueError, match="latency"):
        LinkModel(latency=-1)
    with pytest.raises(ValueError, match="bandwidth"):
        SimNetwork(bandwidth=0)
    with pytest.raises(ValueError, match="bandwidth"):
        SimNetwork().set_bandwidth("a", 1e6, down=-1)
