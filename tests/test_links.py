"""Links that cost: each peer's uplink and downlink, their bandwidths (--bandwidths), and collectives."""

import asyncio

import pytest
import torch

from gossip.codecs import parse_codec, wire_bytes
from gossip.message import Message
from gossip.model_codec import ModelMessages
from peer.config import ConfigError, SimulationConfig, build_config
from peer.sim import LinkModel, SimNetwork, VirtualTimeLoop, averaging
from peer.sim.averaging import AveragingRoom
from peer.sim.links import BandwidthError, Bandwidths, parse_bandwidths


def run(coro):
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coro)


def _message(sender: str, size_bytes: int) -> Message:
    return Message("data", sender, 0, {"x": torch.zeros(size_bytes, dtype=torch.uint8)})


SIZE = _message("a", 1000).wire_size()


def _arrivals(network, sends, receivers):
    """Send ``sends`` (sender, receiver) one after the other at time 0; each receiver's arrival times."""
    endpoints = {peer: network.attach(peer) for peer in {peer for pair in sends for peer in pair} | set(receivers)}
    arrivals = {peer: [] for peer in receivers}
    for peer in receivers:
        endpoints[peer].serve("data", lambda message, peer=peer: _note(arrivals[peer], message))

    async def main():
        for src, dst in sends:
            await endpoints[src].send(dst, _message(src, 1000))
        await asyncio.sleep(1000)

    run(main())
    return arrivals


async def _note(times, message):
    times.append((message.sender, asyncio.get_running_loop().time()))


# --- uplinks and downlinks -------------------------------------------------------------------


def test_one_peer_sending_to_seven_recipients_takes_seven_times_as_long_as_to_one():
    one = _arrivals(SimNetwork(LinkModel(latency=0), bandwidth=SIZE), [("a", "r0")], ["r0"])
    recipients = [f"r{i}" for i in range(7)]
    seven = _arrivals(SimNetwork(LinkModel(latency=0), bandwidth=SIZE), [("a", r) for r in recipients], recipients)
    assert one["r0"] == [("a", pytest.approx(1.0))]
    assert [seven[r] for r in recipients] == [[("a", pytest.approx(i + 1.0))] for i in range(7)]


def test_a_downlink_shared_by_two_senders_halves_their_rate():
    sends = [("a", "b"), ("c", "b"), ("a", "b"), ("c", "b")]
    arrivals = _arrivals(SimNetwork(LinkModel(latency=0), bandwidth=SIZE), sends, ["b"])
    # Alone, a's two messages would be through at 2 s; sharing b's downlink with c, at 3 s and 4 s.
    assert arrivals["b"] == [("a", pytest.approx(1.0)), ("c", pytest.approx(2.0)), ("a", pytest.approx(3.0)),
                             ("c", pytest.approx(4.0))]


def test_a_message_whose_sender_is_busy_does_not_hold_up_a_free_downlink():
    # a's message to b waits on a's uplink until 1 s; c's, sent after it, uses b's idle downlink first.
    sends = [("a", "x"), ("a", "b"), ("c", "b")]
    arrivals = _arrivals(SimNetwork(LinkModel(latency=0), bandwidth=SIZE), sends, ["b", "x"])
    assert arrivals["b"] == [("c", pytest.approx(1.0)), ("a", pytest.approx(2.0))]


def test_a_slow_downlink_delays_what_it_receives_but_not_the_senders_next_message():
    network = SimNetwork(LinkModel(latency=0.5), bandwidth=SIZE)
    network.set_bandwidth("slow", SIZE, down=SIZE / 4)
    arrivals = _arrivals(network, [("a", "slow"), ("a", "b")], ["slow", "b"])
    assert arrivals["slow"] == [("a", pytest.approx(4.5))]
    assert arrivals["b"] == [("a", pytest.approx(2.5))]  # a's uplink was free again at 1 s
    assert network.bandwidth("slow") == (SIZE, SIZE / 4) and network.bandwidth("a") == (SIZE, SIZE)


def test_a_lost_message_takes_its_senders_uplink_but_not_the_receivers_downlink():
    network = SimNetwork(LinkModel(latency=0), bandwidth=SIZE)
    network.set_link("a", "b", LinkModel(latency=0, loss=1.0))
    arrivals = _arrivals(network, [("a", "b"), ("c", "b"), ("a", "c")], ["b", "c"])
    assert arrivals["b"] == [("c", pytest.approx(1.0))]
    assert arrivals["c"] == [("a", pytest.approx(2.0))]


# --- --bandwidths ------------------------------------------------------------------------------


def test_same_gives_every_peer_link_bandwidth_both_ways():
    assert parse_bandwidths("same", 3, 100.0, seed=0) == Bandwidths((100.0,) * 3, (100.0,) * 3)


def test_slow_gives_a_fraction_of_the_peers_chosen_from_the_seed_links_x_times_slower():
    bandwidths = parse_bandwidths("slow:0.25:4", 16, 100.0, seed=3)
    assert sorted(bandwidths.up) == [25.0] * 4 + [100.0] * 12 and bandwidths.down == bandwidths.up
    assert parse_bandwidths("slow:0.25:4", 16, 100.0, seed=3) == bandwidths
    assert parse_bandwidths("slow:0.25:4", 16, 100.0, seed=4) != bandwidths


def test_lognormal_draws_each_peers_links_from_the_seed():
    bandwidths = parse_bandwidths("lognormal:0.5", 50, 100.0, seed=0)
    assert len(set(bandwidths.up)) == 50 and bandwidths.down == bandwidths.up
    assert parse_bandwidths("lognormal:0.5", 50, 100.0, seed=0) == bandwidths
    assert parse_bandwidths("lognormal:0", 3, 100.0, seed=0).up == (100.0,) * 3


def test_a_file_lists_each_peers_uplink_and_optionally_its_downlink(tmp_path):
    path = tmp_path / "bandwidths.txt"
    path.write_text("100\n\n10 50\n  1000   1000 \n")
    assert parse_bandwidths(f"file:{path}", 3, 99.0, seed=0) == Bandwidths((100.0, 10.0, 1000.0), (100.0, 50.0, 1000.0))


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("fast", "unknown --bandwidths 'fast'; valid: same, slow:F:X"),
        ("same:3", "unknown --bandwidths"),
        ("slow:1.5:4", "the fraction of slow peers must be in [0, 1]"),
        ("slow:0.5:0", "slowdown must be > 0"),
        ("slow:x:4", "'x' is not a number"),
        ("lognormal:-1", "SIGMA must be >= 0"),
        ("lognormal:inf", "not a finite number"),
        ("file:", "unknown --bandwidths"),
    ],
)
def test_bad_bandwidth_specs_are_refused_with_the_reason(spec, words):
    with pytest.raises(BandwidthError, match=words.replace("[", r"\[").replace("]", r"\]")):
        parse_bandwidths(spec, 4, 100.0, seed=0)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("100\n100\n", "lists 2 bandwidths for 3 peers; give UP or UP DOWN in Mbit/s per line"),
        ("100\nfast\n100\n", "line 2: 'fast' is not a number of Mbit/s"),
        ("100\n100 0\n100\n", "line 2: a bandwidth must be > 0 Mbit/s"),
        ("100\n100\nnan\n", "line 3: a bandwidth must be > 0"),
        ("100\n1 2 3\n100\n", "line 2: '1 2 3' has 3 numbers; give UP or UP DOWN"),
    ],
)
def test_a_bandwidths_file_that_does_not_fit_is_refused(tmp_path, text, words):
    path = tmp_path / "bandwidths.txt"
    path.write_text(text)
    with pytest.raises(BandwidthError, match=words):
        parse_bandwidths(f"file:{path}", 3, 100.0, seed=0)
    with pytest.raises(BandwidthError, match="--bandwidths file:.* cannot be read"):
        parse_bandwidths(f"file:{tmp_path / 'missing.txt'}", 3, 100.0, seed=0)


def test_the_settings_refuse_a_bad_spec_and_count_the_newcomers(tmp_path):
    with pytest.raises(ConfigError, match="unknown --bandwidths 'warp'"):
        build_config(SimulationConfig, {}, {"bandwidths": "warp"})
    config = SimulationConfig(peers=4, rounds=4, faults="join:2@1", bandwidths="slow:0.5:10", link_bandwidth=20)
    assert len(config.peer_bandwidths.up) == 6 and sorted(config.peer_bandwidths.up) == [2.0] * 3 + [20.0] * 3
    path = tmp_path / "bandwidths.txt"
    path.write_text("10\n" * 4)
    settings = {"peers": 4, "rounds": 4, "faults": "join:2@1", "bandwidths": f"file:{path}"}
    with pytest.raises(ConfigError, match="lists 4 bandwidths for 6 peers"):
        build_config(SimulationConfig, {}, settings)


# --- collectives ---------------------------------------------------------------------------------


def _network(peers, *, latency=0.5, bandwidth=100.0):
    network = SimNetwork(LinkModel(latency=latency), bandwidth=bandwidth)
    network.transports = {peer: network.attach(peer) for peer in peers}
    return network


def _counters(network, peer):
    return network.transports[peer].counters


def test_a_collective_waits_for_its_members_links_and_moves_at_the_slowest_ones_pace():
    network = _network("abc")
    network.set_bandwidth("c", 100.0, down=50.0)

    async def main():
        first = network.collective(["a", "b", "c"], 100, hops=4)
        second = network.collective(["a", "b"], 100, hops=2)  # a and b are busy with the first until 2 s
        return first, second

    assert run(main()) == (pytest.approx(100 / 50 + 4 * 0.5), pytest.approx(2 + 100 / 100 + 2 * 0.5))
    assert [_counters(network, p).bytes_sent for p in "abc"] == [200, 200, 100]
    assert [_counters(network, p).bytes_received for p in "abc"] == [200, 200, 100]
    assert network.bytes_sent() == 500


def _average(room, network, states, round_=0):
    """Every peer of ``states`` averages ``round_``; their results and when they came."""

    doors = {peer: room.join(peer) for peer in states}

    async def one(peer, state):
        averaged = await doors[peer].average(round_, state, 5.0)
        return averaged.state, asyncio.get_running_loop().time()

    async def main():
        return await asyncio.gather(*(one(peer, state) for peer, state in states.items()))

    return run(main())


def _states(k, numel=100):
    return {f"p{i}": {"x": torch.arange(numel, dtype=torch.float32) * (i + 1) / 7} for i in range(k)}


def test_a_dense_codecs_group_is_a_ring_all_reduce():
    states = _states(4)
    network = _network(states)
    results = _average(AveragingRoom(network, parse_codec("none")), network, states)
    # 400 bytes each: 2 (k - 1) / k of them each way, in 2 (k - 1) hops of 0.5 s, at 100 bytes/s.
    assert [when for _, when in results] == [pytest.approx(600 / 100 + 6 * 0.5)] * 4
    assert all(_counters(network, p).bytes_sent == 600 for p in states)
    assert all(_counters(network, p).bytes_received == 600 for p in states)
    mean = torch.stack([state["x"] for state in states.values()]).mean(0)
    assert all(torch.equal(state["x"], mean) for state, _ in results)


def test_a_sparse_codecs_group_gathers_every_encoding_and_the_mean_is_exact():
    states = _states(4)
    network = _network(states)
    results = _average(AveragingRoom(network, parse_codec("topk:0.1")), network, states)
    # 10 kept values and their int32 indices: 80 bytes each, k - 1 of them each way, in k - 1 hops.
    assert [when for _, when in results] == [pytest.approx(240 / 100 + 3 * 0.5)] * 4
    assert all(_counters(network, p).bytes_sent == 240 for p in states)
    assert all(_counters(network, p).bytes_received == 240 for p in states)
    mean = torch.stack([state["x"] for state in states.values()]).mean(0)
    assert all(torch.equal(state["x"], mean) for state, _ in results)


def test_a_lossy_dense_codec_hands_every_member_the_mean_through_the_codec():
    states = _states(3, numel=300)
    network = _network(states)
    codec = parse_codec("int8")
    results = _average(AveragingRoom(network, codec), network, states)
    mean = {"x": torch.stack([state["x"] for state in states.values()]).mean(0)}
    messages = ModelMessages(mean, codec)
    tensors, meta, spec = messages.encode(mean, seed=0)
    expected = messages.decode(tensors, spec, meta)
    assert not torch.equal(expected["x"], mean["x"])  # int8 does not carry this mean exactly
    assert all(torch.equal(state["x"], expected["x"]) for state, _ in results)


def test_the_room_measures_a_contributions_size_once_per_layout(monkeypatch):
    measured = []

    def measure(parts):
        measured.append(sorted(parts))
        return wire_bytes(parts)

    monkeypatch.setattr(averaging, "wire_bytes", measure)
    network = _network(["a", "b"], latency=0.0, bandwidth=1e6)
    room = AveragingRoom(network, parse_codec("none"))
    small = {"x": torch.zeros(10)}
    large = {"x": torch.zeros(10), "y": torch.zeros(4, 5)}
    sent = []
    for round_, state in enumerate([small, large, small, {"x": torch.zeros(2, 5)}]):
        _average(room, network, {"a": state, "b": state}, round_)
        sent.append(network.bytes_sent() - sum(sent))
    # Between two peers a ring all-reduce moves each member's whole contribution: 40, 120, 40, 40 bytes.
    assert sent == [80, 240, 80, 80]
    assert measured == [["x"], ["x", "y"], ["x"]]  # the third round's layout was measured in the first
