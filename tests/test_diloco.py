"""DiLoCo and its gossip forms on the simulator, with vector models whose every step is predictable."""

from __future__ import annotations

import asyncio

import pytest
import torch

from gossip.neighbourhood import RandomGroups
from gossip.outer import ErrorFeedback, OuterOptimizer
from gossip.protocols.diloco import OuterMix
from peer.config import TrainingConfig
from tests.sim_swarm import OuterSwarm, run

DRIFTS = [1.0, 2.0, 3.0, 6.0]  # mean 3


def test_nesterov_moves_the_start_by_the_gradient_plus_momentum_times_the_velocity():
    outer = OuterOptimizer("nesterov", lr=0.5, momentum=0.9)
    first = outer.step({"x": torch.tensor([10.0])}, {"x": torch.tensor([2.0])})
    assert first["x"].item() == pytest.approx(10 - 0.5 * (2 + 0.9 * 2))
    second = outer.step(first, {"x": torch.tensor([1.0])})
    velocity = 0.9 * 2 + 1
    assert second["x"].item() == pytest.approx(first["x"].item() - 0.5 * (1 + 0.9 * velocity))


def test_sgd_with_rate_one_and_no_momentum_takes_the_start_minus_the_gradient():
    outer = OuterOptimizer("sgd", lr=1.0, momentum=0.0)
    moved = outer.step({"x": torch.tensor([5.0]), "count": torch.tensor([3])}, {"x": torch.tensor([2.0])})
    assert moved["x"].item() == 3.0
    assert moved["count"].item() == 3


def test_an_unknown_outer_optimizer_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match="nesterov, sgd"):
        OuterOptimizer("adam", lr=1.0, momentum=0.0)


def test_error_feedback_sends_later_what_the_codec_dropped():
    feedback = ErrorFeedback()
    total = feedback.with_residual({"x": torch.tensor([1.0, 0.2])})
    feedback.keep(total, {"x": torch.tensor([1.0, 0.0])})
    assert feedback.with_residual({"x": torch.tensor([0.0, 0.1])})["x"].tolist() == pytest.approx([0.0, 0.3])


@pytest.mark.parametrize("spec, expected", [("all", OuterMix("all")), ("gossip:1", OuterMix("gossip", 2)),
                                            ("gossip:3", OuterMix("gossip", 4)), ("neighbours", OuterMix("neighbours"))])
def test_outer_mixes_are_read_from_their_specs(spec, expected):
    assert OuterMix.parse(spec) == expected


@pytest.mark.parametrize("spec", ["gossip", "gossip:0", "gossip:x", "ring", "all:2"])
def test_a_bad_outer_mix_is_refused_naming_the_valid_ones(spec):
    with pytest.raises(ValueError, match="gossip:S"):
        OuterMix.parse(spec)


def test_all_gives_every_peer_the_same_start_moved_by_the_mean_pseudo_gradient():
    swarm = OuterSwarm(DRIFTS, rounds=1)
    run(swarm.run())
    # Each peer ends its inner step at its drift: pseudo-gradient -drift, mean -3; Nesterov from 0.
    assert swarm.values() == pytest.approx(dict.fromkeys(swarm.ids, 0.7 * (3 + 0.9 * 3)))
    assert [(r.neighbours_expected, r.neighbours_heard) for r in swarm.reports["p0"]] == [(3, 3)]


def test_synchronous_settings_make_every_step_the_mean_update():
    swarm = OuterSwarm(DRIFTS, rounds=5, optimizer="sgd", lr=1.0, momentum=0.0)
    run(swarm.run())
    assert swarm.values() == pytest.approx(dict.fromkeys(swarm.ids, 5 * 3.0))


def test_a_peer_that_crashes_is_left_out_of_the_average_and_the_others_finish_every_round():
    swarm = OuterSwarm(DRIFTS, rounds=3, optimizer="sgd", lr=1.0, momentum=0.0, timeout=5.0)

    async def crash_then_run():
        swarm.start("p3")
        await asyncio.sleep(0)
        swarm.crash("p3")  # before it averaged anything
        await swarm.run()

    run(crash_then_run())
    # Without p3 the mean drift is 2: three rounds of it.
    assert {peer: value for peer, value in swarm.values().items() if peer != "p3"} == pytest.approx(
        dict.fromkeys(["p0", "p1", "p2"], 6.0)
    )
    assert [len(swarm.reports[peer]) for peer in ("p0", "p1", "p2")] == [3, 3, 3]
    assert [r.neighbours_heard for r in swarm.reports["p0"]] == [2, 2, 2]


def test_gossip_1_pairs_each_peer_with_exactly_one_other_every_round():
    swarm = OuterSwarm(DRIFTS, mix="gossip:1", rounds=4, optimizer="sgd", lr=1.0, momentum=0.0)
    run(swarm.run())
    for peer in swarm.ids:
        assert [(r.neighbours_expected, r.neighbours_heard) for r in swarm.reports[peer]] == [(1, 1)] * 4


def test_gossip_pulls_each_start_towards_its_partners_and_moves_it_by_the_pair_mean():
    swarm = OuterSwarm([1.0, 3.0], mix="gossip:1", rounds=1, optimizer="sgd", lr=0.5, momentum=0.0)
    swarm.learners["p1"].value += 10.0  # p1 starts at 10
    run(swarm.run())
    # Mean pseudo-gradient -2, mean start 5: p0's outer gradient is -2 + 0 - 5 = -7, p1's -2 + 10 - 5 = 3.
    assert swarm.values() == pytest.approx({"p0": 0 - 0.5 * -7, "p1": 10 - 0.5 * 3})


def test_neighbours_mixes_with_the_rings_weights():
    swarm = OuterSwarm(DRIFTS, mix="neighbours", rounds=1, optimizer="sgd", lr=1.0, momentum=0.0)
    run(swarm.run())
    # Metropolis weights on a ring of 4: 1/3 each; p0 mixes p3 and p1: pseudo-gradients -6, -1, -2.
    assert swarm.values()["p0"] == pytest.approx((1 + 2 + 6) / 3)


def test_random_groups_agree_between_peers_and_change_every_step():
    ids = [f"p{i}" for i in range(7)]
    groups = {peer: RandomGroups(peer, lambda: ids, 2, seed=3) for peer in ids}
    for step in range(5):
        for neighbourhood in groups.values():
            group = neighbourhood.group(step)
            assert all(groups[other].group(step) == group for other in group)
        assert sum(len(groups[p].group(step)) == 1 for p in ids) == 1  # 7 peers: three pairs and one alone
    assert groups["p0"].group(0) != groups["p0"].group(1) or groups["p0"].group(1) != groups["p0"].group(2)


def test_a_resumed_peer_takes_the_same_next_outer_step():
    straight = OuterSwarm(DRIFTS, rounds=3)
    run(straight.run())

    first = OuterSwarm(DRIFTS, rounds=2)
    run(first.run())
    saved = {peer: (learner.state(), first.protocols[peer].save_state()) for peer, learner in first.learners.items()}
    resumed = OuterSwarm(DRIFTS, rounds=3)
    for peer, (model, (tensors, meta)) in saved.items():
        resumed.learners[peer].load_state(model)
        resumed.protocols[peer].restore_state(tensors, meta)
    run(resumed.run(first_round=2))
    assert resumed.values() == pytest.approx(straight.values())


def test_a_checkpoint_of_another_outer_optimizer_is_refused():
    swarm = OuterSwarm(DRIFTS, rounds=1)
    tensors, _ = swarm.protocols["p0"].save_state()
    with pytest.raises(ValueError, match="'sgd' outer optimizer"):
        swarm.protocols["p0"].restore_state(tensors, {"outer_optimizer": "sgd"})


def test_a_newcomer_starts_from_a_running_peers_start_point_momentum_and_round():
    swarm = OuterSwarm(DRIFTS[:3], rounds=4, optimizer="sgd", lr=1.0, momentum=0.5)

    async def join_later():
        for peer in list(swarm.ids):
            swarm.start(peer)
        while len(swarm.reports["p0"]) < 2:
            await asyncio.sleep(0.001)
        swarm.arrive("p3", drift=2.0)
        await swarm.run()

    run(join_later())
    assert [r.round for r in swarm.reports["p3"]] == [2, 3]
    assert swarm.protocols["p3"].outer.velocity["x"].item() == pytest.approx(
        swarm.protocols["p0"].outer.velocity["x"].item()
    )
    assert len({round(value, 9) for value in swarm.values().values()}) == 1  # one start point, -100 forgotten


def test_lossy_pseudo_gradients_reach_the_same_start_point_for_every_peer():
    swarm = OuterSwarm(DRIFTS, rounds=3, codec="topk:0.5", optimizer="sgd", lr=1.0, momentum=0.0)
    run(swarm.run())
    assert len(set(swarm.values().values())) == 1


def _config(**settings):
    return TrainingConfig(algorithm="diloco", **settings)


def test_a_topology_without_outer_mix_neighbours_is_refused():
    with pytest.raises(ValueError, match="--topology sets the graph of --outer-mix neighbours"):
        _config(topology="ring")


def test_a_robust_mixing_rule_with_the_all_reduce_is_refused():
    with pytest.raises(ValueError, match="an all-reduce hands back only their mean"):
        _config(mixing="median")


def test_an_unknown_outer_optimizer_setting_is_refused():
    with pytest.raises(ValueError, match="not one of nesterov, sgd"):
        _config(outer_optimizer="adam")


def test_the_simulated_room_averages_once_everyone_is_there_and_a_late_comer_gets_nothing():
    from gossip.codecs import parse_codec
    from peer.sim import SimNetwork
    from peer.sim.averaging import AveragingRoom

    network = SimNetwork()
    room = AveragingRoom(network, parse_codec("none"))
    doors = {peer: room.join(peer) for peer in ("a", "b", "c")}
    for peer in doors:
        network.attach(peer)

    async def average_all():
        first = await asyncio.gather(*(doors[p].average(0, {"x": torch.tensor([float(i)])}, 5.0) for i, p in enumerate("ab")))
        late = await doors["c"].average(0, {"x": torch.tensor([9.0])}, 5.0)
        return first, late

    network.crash("c")  # c is not awaited: the group of round 0 is a and b
    first, late = run(average_all())
    assert [result.state["x"].item() for result in first] == [0.5, 0.5]
    assert first[0].group == frozenset({"a", "b"}) and late is None
    assert network.bytes_sent() == 2 * (2 * 1 * 4 // 2)  # a ring all-reduce of 4 bytes between 2 peers


def _failing_at(swarm, peer, failed_round):
    door = swarm.protocols[peer].context.averaging
    average = door.average

    async def failing(round_, state, timeout):
        return None if round_ == failed_round else await average(round_, state, timeout)

    door.average = failing


def test_a_peer_whose_average_failed_takes_the_swarms_start_point_and_sends_its_pseudo_gradient_later():
    swarm = OuterSwarm(DRIFTS, rounds=3, optimizer="sgd", lr=1.0, momentum=0.0)
    _failing_at(swarm, "p3", 1)
    run(swarm.run())
    # Round 0: mean drift 3. Round 1 without p3: mean 2. Round 2: p3's two rounds (12) and the others' one.
    assert swarm.values() == pytest.approx(dict.fromkeys(swarm.ids, 3 + 2 + (1 + 2 + 3 + 12) / 4))
    assert [r.neighbours_heard for r in swarm.reports["p3"]] == [3, 0, 3]


def test_when_the_whole_group_fails_nobody_moves_and_the_pseudo_gradients_go_in_the_next_round():
    swarm = OuterSwarm(DRIFTS, rounds=2, optimizer="sgd", lr=1.0, momentum=0.0)
    for peer in swarm.ids:
        _failing_at(swarm, peer, 0)
    run(swarm.run())
    assert swarm.values() == pytest.approx(dict.fromkeys(swarm.ids, 2 * 3.0))
