"""MoDeST on the simulated world: sampling, aggregation, and the failures it must survive."""

import asyncio

import pytest
import torch

from gossip.message import Message
from gossip.protocols import ModestSettings
from gossip.protocols.modest import LEAVE, MODEL, PING
from gossip.sampling import hash_order
from gossip.view import MAX_SENT_ROWS, Entry, View, decode_view
from peer.config import SimulationConfig
from peer.sim import LinkModel, SimNetwork
from tests.sim_swarm import ModestSwarm as Swarm
from tests.sim_swarm import evil_member, run


class CountingNetwork(SimNetwork):
    """Counts the messages addressed to each peer."""

    def __init__(self):
        super().__init__(LinkModel(latency=0.01))
        self.addressed: dict[str, int] = {}

    def transmit(self, src, dst, message, on_arrival):
        self.addressed[dst] = self.addressed.get(dst, 0) + 1
        super().transmit(src, dst, message, on_arrival)


def test_each_round_averages_its_sample_and_every_peer_ends_with_the_final_model():
    swarm = Swarm(16, rounds=6, sample_size=4)
    run(swarm.run())
    assert [r.round for _, r in swarm.reports] == list(range(6))
    assert all(r.neighbours_heard == 4 for _, r in swarm.reports)
    # Round 0's sample trains from its own values (+1); each later round adds 1 to the average.
    sample = hash_order(swarm.ids, 0)[:4]
    expected = sum(float(int(p[1:])) for p in sample) / 4 + 1 + 5
    for learner in swarm.learners.values():
        assert learner.value.item() == pytest.approx(expected)


def test_every_aggregator_reports_its_round():
    swarm = Swarm(16, rounds=5, sample_size=4, aggregators=2)
    run(swarm.run())
    per_round = [sum(1 for _, r in swarm.reports if r.round == k) for k in range(5)]
    assert per_round == [2] * 5


def test_a_success_fraction_aggregates_before_the_slowest_models():
    swarm = Swarm(16, rounds=4, sample_size=4, success_fraction=0.5)
    run(swarm.run())
    assert swarm.rounds_reported() == [0, 1, 2, 3]
    assert all(r.neighbours_heard == 2 and r.neighbours_expected == 2 for _, r in swarm.reports)


def test_training_goes_on_when_the_only_aggregator_of_a_round_crashes():
    swarm = Swarm(16, rounds=8, sample_size=4)
    crashed = []

    def crash_next_aggregator(peer, report):
        if report.round == 2 and not crashed:
            aggregator = hash_order(swarm.live(), 3)[0]
            crashed.append(aggregator)
            swarm.crash(aggregator)

    swarm.on_report = crash_next_aggregator
    run(swarm.run())
    assert swarm.rounds_reported() == list(range(8))
    assert crashed and crashed[0] not in {peer for peer, r in swarm.reports if r.round >= 3}
    final = {swarm.learners[p].value.item() for p in swarm.live()}
    assert len(final) == 1


def test_trainers_hand_their_models_on_when_their_aggregator_acknowledged_and_died():
    swarm = Swarm(16, rounds=6, sample_size=4)
    crashed = []
    for protocol in swarm.protocols.values():

        def close(round_, protocol=protocol, close=protocol._close):
            if round_ == 3 and not crashed:  # it holds every model of the round, and dies with them
                crashed.append(protocol.me)
                swarm.crash(protocol.me)
                return
            close(round_)

        protocol._close = close
    run(swarm.run())
    assert crashed
    assert swarm.rounds_reported() == list(range(6))
    assert crashed[0] not in {peer for peer, r in swarm.reports if r.round >= 3}


def test_a_round_whose_trainers_all_crash_is_restarted():
    swarm = Swarm(16, rounds=6, sample_size=4)
    crashed = []

    def crash_the_next_trainers(peer, report):
        if report.round == 2 and not crashed:
            trainers = [p for p in hash_order(swarm.ids, 3)[:4] if p != peer]
            crashed.extend(trainers)

            def crash():  # once they have the model, before they can hand it on
                for trainer in trainers:
                    swarm.crash(trainer)

            asyncio.get_running_loop().call_later(0.035, crash)

    swarm.on_report = crash_the_next_trainers
    run(swarm.run())
    assert crashed
    assert swarm.rounds_reported() == list(range(6))


def test_a_dead_peer_is_pinged_once_per_sampler_not_every_round():
    network = CountingNetwork()
    swarm = Swarm(16, rounds=30, network=network, sample_size=4)
    dead = swarm.ids[:4]

    async def main():
        for peer in swarm.ids:
            swarm.start(peer)
        for peer in dead:
            swarm.crash(peer)
        await swarm.run()

    run(main())
    assert swarm.rounds_reported() == list(range(30))
    live = len(swarm.ids) - len(dead)
    for peer in dead:
        # At most one failed ping from each live peer, plus the final model's broadcast.
        assert network.addressed.get(peer, 0) <= 2 * live


def test_rounds_far_ahead_and_malformed_views_are_refused_and_counted():
    swarm = Swarm(4, rounds=3, sample_size=2)
    target = swarm.protocols["p00"]
    liar = View("p01", swarm.ids)
    liar.touch("p02", 10**6)

    async def main():
        transport = swarm.protocols["p01"].context.transport
        for message in (
            Message(PING, "p01", 0, liar.encode()),  # an inflated activity
            Message(PING, "p01", 10**6, View("p01", swarm.ids).encode()),  # an inflated round
            Message(PING, "p01", 0, {"view": torch.ones(3, dtype=torch.uint8)}),
        ):
            with pytest.raises(TimeoutError):
                await transport.request("p00", message, timeout=1.0)

    run(main())
    assert target.context.transport.counters.rejections["implausible"] == 2
    assert target.context.transport.counters.rejections["malformed"] == 1
    assert target.view.estimate() < 100


def test_a_newcomer_joins_and_is_sampled_and_a_leaver_is_not():
    swarm = Swarm(8, rounds=40, sample_size=3)
    swarm.add("p08", peers=swarm.ids, joining=True)
    swarm.ids.append("p08")
    leaver = "p03"

    async def main():
        for peer in swarm.protocols:
            swarm.start(peer)
        await swarm.protocols[leaver].leave()
        swarm.crash(leaver)
        await swarm.run()

    run(main())
    assert swarm.rounds_reported() == list(range(40))
    assert "p08" in {peer for peer, _ in swarm.reports}  # it aggregated a round, so it was sampled
    assert leaver not in {peer for peer, _ in swarm.reports}
    # A LEAVE counts only from the leaver itself: the peers it told know; the newcomer it did not
    # know of finds it dead when it pings it.
    assert all(swarm.protocols[p].view.left(leaver) for p in swarm.live() if p != "p08")


def test_settings_out_of_range_are_refused():
    with pytest.raises(ValueError, match="aggregators"):
        ModestSettings(sample_size=2, aggregators=3)
    with pytest.raises(ValueError, match="success fraction"):
        ModestSettings(success_fraction=0)
    with pytest.raises(ValueError, match="sample size"):
        ModestSettings(sample_size=0)


def test_error_feedback_is_refused():
    with pytest.raises(ValueError, match="there is no error feedback; use --error-feedback none"):
        SimulationConfig(algorithm="modest", codec="int8", error_feedback="choco")


def test_a_lossy_codec_carries_the_models():
    finals, sent = [], []
    for codec in ("none", "fp16"):
        swarm = Swarm(8, rounds=3, sample_size=2, codec=codec, size=1000)
        run(swarm.run())
        finals.append(swarm.learners["p00"].value[0].item())
        sent.append(swarm.network.bytes_sent())
    assert finals[1] == pytest.approx(finals[0], rel=1e-3)
    assert sent[1] < sent[0]


def test_a_peer_that_is_not_sampled_keeps_its_view_fresh():
    def largest_lag(heartbeat):
        swarm = Swarm(40, rounds=80, sample_size=1, heartbeat=heartbeat)
        lag = {}

        def measure(peer, report):
            if report.round == 70 and not lag:
                lag.update({p: 70 - protocol.view.estimate() for p, protocol in swarm.protocols.items()})

        swarm.on_report = measure
        run(swarm.run())
        return max(lag.values())

    # Without heartbeats some peers never hear of a round; with them, every view moves on.
    assert largest_lag(heartbeat=1000) == 70
    assert largest_lag(heartbeat=0.5) < 60


# --- a member that lies --------------------------------------------------------------------


def test_a_goodbye_counts_only_from_the_peer_that_leaves():
    swarm = Swarm(4, rounds=3, sample_size=2)
    evil = evil_member(swarm, 3)
    evil.view.merge({"p02": Entry(0, 2**40, True)})  # "p02 left, and will never announce anything again"

    async def main():
        await evil.context.transport.send("p00", evil._message(LEAVE, 0))
        await swarm.run()

    run(main())
    target = swarm.protocols["p00"]
    assert not target.view.left("p02") and target.view.entries["p02"].index == 0
    assert target.view.left(evil.me)  # its own goodbye counts
    assert swarm.rounds_reported() == [0, 1, 2]


def test_made_up_peers_never_enter_a_view_and_a_view_too_long_is_refused():
    swarm = Swarm(4, rounds=3, sample_size=2)
    evil = evil_member(swarm, 3)
    transport = evil.context.transport
    crowd = View(evil.me)
    crowd.merge({f"made-up-{i:04d}-" + "x" * 100: Entry(0) for i in range(2 * MAX_SENT_ROWS)})
    target = swarm.protocols["p00"]

    async def main():
        await transport.send("p00", Message(LEAVE, evil.me, 0, crowd.encode()))  # a sample of the crowd
        await transport.send("p00", Message(LEAVE, evil.me, 0, crowd.encode(max_rows=None)))  # all of it
        await asyncio.sleep(1.0)  # until both have arrived

    run(main())
    assert sorted(target.view.entries) == sorted(swarm.ids + [evil.me])
    assert target.context.transport.counters.rejections["malformed"] == 1  # more rows than a message may carry


def test_a_full_view_evicts_its_least_recently_active_peer_and_sends_a_bounded_sample():
    view = View("me", [], max_entries=3)
    view.merge({"old": Entry(1), "recent": Entry(5)})
    view.merge({"new": Entry(3)})
    assert sorted(view.entries) == ["me", "new", "recent"]
    view.merge({"older": Entry(0)})  # no fresher than anything held: not taken
    assert "older" not in view.entries
    big = View("me", [f"p{i:04d}" for i in range(3000)])
    big.touch("p0042", 9)
    rows = decode_view(big.encode(), max_round=10)
    assert len(rows) == MAX_SENT_ROWS and "me" in rows and rows["p0042"] == Entry(9)


def test_claims_ratcheted_round_by_round_and_a_forged_final_model_neither_end_the_run_nor_install_a_model():
    rounds = 30
    swarm = Swarm(8, rounds=rounds, sample_size=2)
    evil = evil_member(swarm, rounds)
    transport = evil.context.transport
    honest = list(swarm.ids)

    async def attack():
        await asyncio.sleep(0.05)
        for step in range(1, 121):  # each claim 50 rounds past the one before
            evil.view.touch(evil.me, 50 * step)
            await asyncio.gather(*(transport.send(peer, evil._message(LEAVE, 50 * step)) for peer in honest))
        poison = {"x": torch.full((1,), 1e30, dtype=torch.float64)}
        evil.view.touch(evil.me, rounds - 1)
        await asyncio.gather(*(transport.send(peer, evil._message(MODEL, rounds - 1, poison)) for peer in honest))

    async def main():
        for peer in honest:
            swarm.start(peer)
        await asyncio.gather(attack(), *(swarm.tasks[peer] for peer in honest))

    run(main())
    assert swarm.rounds_reported() == list(range(rounds))
    assert all(abs(swarm.learners[peer].value.item()) < 1e3 for peer in honest)
    refused = sum(swarm.protocols[peer].context.transport.counters.rejections["implausible"] for peer in honest)
    assert refused >= len(honest) * 100  # most of the ratchet, and the final model, at every peer
    assert all(swarm.protocols[peer].view.estimate() <= rounds for peer in honest)


def test_a_newcomer_starts_from_the_median_of_the_rounds_it_is_told():
    swarm = Swarm(4, rounds=3, sample_size=2)
    swarm.add("p04", peers=swarm.ids, joining=True)
    newcomer = swarm.protocols["p04"]
    liar = swarm.protocols["p03"]
    liar.view.touch(liar.me, 10**6)  # it answers the JOIN with a round nobody is at

    async def main():
        await newcomer._join()

    run(main())
    assert newcomer.view.estimate() == 0
    assert newcomer.context.transport.counters.rejections["implausible"] == 1


def test_the_last_rounds_aggregator_is_believed_though_its_goodbye_came_first():
    swarm = Swarm(16, rounds=3, sample_size=2)
    target = swarm.protocols["p00"]
    order = [peer for peer in hash_order(swarm.ids, 2) if peer != "p00"]
    aggregator, last_in_order = order[0], order[-1]
    target.view.merge({aggregator: Entry(2, 1, True)})  # it left right after sending the final model
    assert target._could_aggregate(aggregator, 2)
    assert not target._could_aggregate(last_in_order, 2)
