"""Averaging in groups between real peers (peer.net.averaging): hivemind's all-reduce between DHT
nodes on loopback, each group's members checked against the swarm's admission afterwards. All but
the first test start real processes (``network``)."""

import asyncio
import contextlib
import os
import re
import signal
import time

import hivemind
import pytest
import torch
from hivemind.compression import Float16Compression, NoCompression

from gossip.transport import TrafficCounters, admit_everyone
from peer.errors import ConfigError
from peer.net.averaging import HivemindAveraging, all_reduce_compression
from peer.net.reaper import descendants
from tests.helpers import LOOPBACK

pytestmark = pytest.mark.timeout(60)

REFERENCE = {"w": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float64)}
MATCHMAKING = 1.0  # seconds: peers started together find each other well within it on loopback
FRAGMENTS = (("w",), ("b",))  # two disjoint fragments of REFERENCE, averaged in turn as outer-optimizer training may


def state(k: float) -> dict[str, torch.Tensor]:
    """k times a fixed state of small integers: means of such states are exact in float32."""
    return {"w": k * torch.arange(12.0).reshape(3, 4), "b": k * torch.arange(5.0, dtype=torch.float64)}


def fragment(k: float, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in state(k).items() if name in names}


def averager_processes() -> set[int]:
    """This process's descendants: the DHT nodes' processes and daemons, and every averager's process."""
    return set(descendants(os.getpid()))


def members_only(*members: str):
    async def admits(peer: str) -> bool:
        return peer in members

    return admits


@contextlib.contextmanager
def averagings(nodes, prefix, admissions=None, matchmaking_time=MATCHMAKING):
    """A HivemindAveraging on each of the ``dhts`` fixture's ``nodes``, all closed afterwards."""
    started = []
    try:
        for i, (dht, _) in enumerate(nodes):
            admission = admissions[i] if admissions else admit_everyone
            started.append(HivemindAveraging(
                dht, prefix, REFERENCE, admission, counters=TrafficCounters(), matchmaking_time=matchmaking_time,
            ))
        yield started
    finally:
        for averaging in started:
            averaging.close()


def test_the_all_reduce_carries_the_codecs_none_and_fp16_and_refuses_the_others_with_a_config_error():
    assert type(all_reduce_compression("none")) is NoCompression
    assert type(all_reduce_compression("fp16")) is Float16Compression
    for codec in ("bf16", "int8", "topk:0.1+fp16"):
        with pytest.raises(ConfigError, match=f"--codec {re.escape(codec)}: .*use --codec fp16 or none"):
            all_reduce_compression(codec)


@pytest.mark.network
async def test_three_peers_averaging_distinct_tensors_at_once_all_get_their_exact_mean_and_name_the_three(dhts):
    nodes = [dhts[0], dhts[1], dhts[3]]
    with averagings(nodes, "three") as peers:
        results = await asyncio.gather(*(p.average(7, state(k), timeout=20) for p, k in zip(peers, (1, 2, 6))))
    everyone = frozenset(dht.peer_id.to_base58() for dht, _ in nodes)
    for result in results:
        assert result is not None and result.group == everyone
        assert result.state.keys() == REFERENCE.keys()
        for name, tensor in result.state.items():
            assert tensor.dtype == REFERENCE[name].dtype and torch.equal(tensor, state(3)[name])


@pytest.mark.network
async def test_a_member_that_one_peer_does_not_admit_makes_that_peer_refuse_the_round_and_keep_its_tensors(dhts):
    (alice, _), (bob, _) = dhts[0], dhts[1]
    alone = members_only(alice.peer_id.to_base58())  # alice admits nobody else
    own, others = state(1), state(3)
    with averagings([dhts[0], dhts[1]], "refused", [alone, admit_everyone]) as (refusing, admitting):
        refused, averaged = await asyncio.gather(
            refusing.average(2, own, timeout=20), admitting.average(2, others, timeout=20)
        )
    assert refused is None and refusing.counters.rejections == {"not-member": 1}
    assert all(torch.equal(own[name], state(1)[name]) for name in own)  # its own state, untouched
    assert averaged is not None and averaged.group == {alice.peer_id.to_base58(), bob.peer_id.to_base58()}
    assert all(torch.equal(averaged.state[name], state(2)[name]) for name in REFERENCE)
    assert admitting.counters.rejected == 0


@pytest.mark.network
async def test_a_lone_peer_gets_none_within_its_timeout(dhts):
    with averagings([dhts[0]], "lone") as (lone,):
        started = time.monotonic()
        result = await lone.average(0, state(1), timeout=3)
        elapsed = time.monotonic() - started
    assert result is None and elapsed < 3 + 1.0
    assert lone.counters.rejected == 0  # nobody to refuse: no group formed


@pytest.mark.network
async def test_peers_averaging_different_rounds_are_never_grouped(dhts):
    with averagings([dhts[0], dhts[1]], "rounds") as (first, second):
        results = await asyncio.gather(first.average(5, state(1), timeout=3), second.average(6, state(3), timeout=3))
    assert results == [None, None]  # each round is matched under a key of its own
    assert first.counters.rejected == second.counters.rejected == 0


@pytest.mark.network
async def test_a_state_with_a_wrong_shape_is_refused_with_value_error_before_anything_is_sent(dhts):
    wrong = {"w": torch.zeros(4, 3), "b": torch.zeros(5, dtype=torch.float64)}
    with averagings([dhts[0], dhts[1]], "wrong") as (sender, other):
        with pytest.raises(ValueError, match="w: \\(4, 3\\)"):
            await sender.average(0, wrong, timeout=3)
        # Nothing was sent: the other peer, averaging the same round, finds nobody to average with.
        assert await other.average(0, state(1), timeout=3) is None


@pytest.mark.network
async def test_a_member_killed_while_its_group_is_matched_is_left_out_and_the_others_average_without_it(dhts):
    victim = hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=dhts[0][0].get_visible_maddrs())
    try:
        with averagings([dhts[0], dhts[1], (victim, None)], "killed", matchmaking_time=2.0) as peers:
            calls = [asyncio.create_task(p.average(4, state(k), timeout=10)) for p, k in zip(peers, (1, 3, 100))]
            await asyncio.sleep(0.5)  # matching: the group is assembled 2 s after its first member asked
            for pid in [victim.pid, *descendants(victim.pid)]:  # its DHT and p2p daemon: nobody reaches it
                os.kill(pid, signal.SIGKILL)
            survivors = await asyncio.gather(*calls[:2])
            calls[2].cancel()
    finally:
        if victim.is_alive():
            victim.shutdown()
    everyone_left = {dht.peer_id.to_base58() for dht, _ in dhts[:2]}
    for result in survivors:
        assert result is not None and result.group == everyone_left
        assert all(torch.equal(result.state[name], state(2)[name]) for name in REFERENCE)


@pytest.mark.network
async def test_peers_averaging_two_fragments_in_turn_get_the_exact_mean_of_each_every_round_counted_together(dhts):
    nodes = [dhts[0], dhts[1]]
    everyone = frozenset(dht.peer_id.to_base58() for dht, _ in nodes)
    with averagings(nodes, "fragments") as peers:
        for round_ in range(4):
            names = FRAGMENTS[round_ % 2]
            results = await asyncio.gather(
                *(p.average(round_, fragment(round_ + k, names), timeout=20) for p, k in zip(peers, (1, 3)))
            )
            for result in results:
                assert result is not None and result.group == everyone
                assert result.state.keys() == set(names)
                for name, tensor in result.state.items():
                    assert tensor.dtype == REFERENCE[name].dtype and torch.equal(tensor, state(round_ + 2)[name])
    # Both fragments' traffic in the same counters: in a pair each sends half its tensors (float32) and
    # receives half the mean, so a fragment's whole size each way per round, and each fragment averaged twice.
    assert all(p.counters.bytes_sent == p.counters.bytes_received == 2 * 4 * (12 + 5) for p in peers)


@pytest.mark.network
async def test_two_fragments_averaged_at_once_each_get_their_exact_mean(dhts):
    # As with --overlap, where one round's fragment may still travel as the next starts: each
    # fragment's averager starts (a fork) while the other's may already be matching.
    nodes = [dhts[0], dhts[1]]
    with averagings(nodes, "overlapping") as peers:
        calls = [
            p.average(round_, fragment(k, FRAGMENTS[round_]), timeout=20)
            for p, k in zip(peers, (1, 3)) for round_ in (0, 1)
        ]
        results = await asyncio.gather(*calls)
    for result, round_ in zip(results, (0, 1, 0, 1)):
        assert result is not None and len(result.group) == 2 and result.state.keys() == set(FRAGMENTS[round_])
        assert all(torch.equal(tensor, state(2)[name]) for name, tensor in result.state.items())


@pytest.mark.network
async def test_peers_averaging_different_fragments_of_a_round_are_never_grouped(dhts):
    with averagings([dhts[0], dhts[1]], "apart") as (first, second):
        results = await asyncio.gather(
            first.average(3, fragment(1, FRAGMENTS[0]), timeout=3), second.average(3, fragment(3, FRAGMENTS[1]), timeout=3)
        )
    assert results == [None, None]  # each fragment is matched under a group prefix of its own
    assert first.counters.rejected == second.counters.rejected == 0


@pytest.mark.network
async def test_a_fragment_not_laid_out_as_the_reference_is_refused_with_value_error_before_any_averager_starts(dhts):
    wrong = [
        ({"w": torch.zeros(3, 4), "x": torch.zeros(2)}, "x: not in the reference state"),
        ({"w": torch.zeros(4, 3)}, "w: (4, 3) torch.float32, averaged as (3, 4) torch.float32"),
        ({"b": torch.zeros(5)}, "b: (5,) torch.float32, averaged as (5,) torch.float64"),
        ({}, "nothing to average"),
    ]
    before = averager_processes()
    with averagings([dhts[0]], "unknown") as (peer,):
        for state_, message in wrong:
            with pytest.raises(ValueError, match=re.escape(message)):
                await peer.average(0, state_, timeout=3)
        assert averager_processes() == before


@pytest.mark.network
async def test_close_stops_the_averager_of_every_fragment_and_later_rounds_get_none(dhts):
    before = averager_processes()
    with averagings([dhts[0]], "closed") as (peer,):
        for round_, names in enumerate(FRAGMENTS):  # alone: no group, but each fragment's averager starts
            assert await peer.average(round_, fragment(1, names), timeout=1) is None
        started = averager_processes() - before
        assert len(started) == len(FRAGMENTS)
    assert not started & averager_processes()  # gone (and reaped) once closed
    assert await peer.average(2, fragment(1, FRAGMENTS[0]), timeout=1) is None
