"""Streaming DiLoCo on the simulator: fragments combined in turn, combinations that travel while the
next inner steps run, and the error feedback of compressed pseudo-gradients."""

from __future__ import annotations

import asyncio

import pytest
import torch

from gossip.outer import ErrorFeedback, split_fragments
from gossip.protocols.diloco import Streaming
from peer.config import TrainingConfig
from tests.sim_swarm import OuterSwarm, run

DRIFTS = [1.0, 2.0, 3.0, 6.0]  # mean 3
PLAIN = {"optimizer": "sgd", "lr": 1.0, "momentum": 0.0}  # the outer step adds the mean pseudo-gradient


def _sizes(*numels):
    return {f"t{i}": torch.zeros(n) for i, n in enumerate(numels)}


def test_fragments_are_consecutive_tensors_of_about_equal_size():
    assert split_fragments(_sizes(10, 10, 10, 10), 2) == (("t0", "t1"), ("t2", "t3"))
    assert split_fragments(_sizes(10, 10, 10, 10), 4) == (("t0",), ("t1",), ("t2",), ("t3",))
    assert split_fragments(_sizes(5, 5, 20, 5, 5), 2) == (("t0", "t1", "t2"), ("t3", "t4"))


def test_a_tensor_larger_than_its_share_still_leaves_every_later_fragment_one_tensor():
    assert split_fragments(_sizes(100, 1, 1), 3) == (("t0",), ("t1",), ("t2",))
    assert split_fragments(_sizes(1, 1, 100), 2) == (("t0", "t1"), ("t2",))


def test_more_fragments_than_tensors_are_refused():
    with pytest.raises(ValueError, match="between 1 and 2"):
        split_fragments(_sizes(1, 1), 3)


def test_each_round_combines_one_fragment_while_the_others_go_on_training():
    swarm = OuterSwarm(DRIFTS, rounds=2, parts=2, streaming=Streaming(fragments=2), **PLAIN)
    run(swarm.run())
    # Round 0 combines x0 (mean drift 3); x1 trains on. Round 1 combines x1 after its two rounds
    # (mean 6), while x0 takes one more step of each peer's own drift.
    assert swarm.vectors() == {peer: [3.0 + drift, 6.0] for peer, drift in zip(swarm.ids, DRIFTS)}


def test_a_round_all_reduces_only_its_fragment():
    whole = OuterSwarm(DRIFTS, rounds=2, parts=2, **PLAIN)
    run(whole.run())
    streamed = OuterSwarm(DRIFTS, rounds=2, parts=2, streaming=Streaming(fragments=2), **PLAIN)
    run(streamed.run())
    assert streamed.network.bytes_sent() * 2 == whole.network.bytes_sent()
    assert (streamed.room.peak_bytes, whole.room.peak_bytes) == (2 * 3 * 8 // 4, 2 * 3 * 16 // 4)  # float64 values


def test_an_overlapped_update_lands_later_and_is_merged_with_the_local_copy():
    swarm = OuterSwarm(DRIFTS, rounds=2, local_steps=2, streaming=Streaming(overlap=1, keep=0.5), **PLAIN)
    run(swarm.run())
    # Round 0 ends at 2d and sends -2d (mean -6). One step later (3d) the update lands: the start moves
    # to 6 and the copy to (3d + 6) / 2; one more step gives 2.5d + 3. The last round waits for its
    # combination: 6 - mean(6 - 2.5d - 3) = 6 + 4.5.
    assert swarm.values() == pytest.approx(dict.fromkeys(swarm.ids, 10.5))


def test_a_peer_waits_only_for_what_the_overlapped_steps_did_not_cover():
    swarm = OuterSwarm(DRIFTS, rounds=2, local_steps=2, streaming=Streaming(overlap=1), **PLAIN)
    run(swarm.run())
    first, last = swarm.reports["p0"]
    assert first.exchange_seconds == 0.0  # its combination was still travelling when the round ended
    # The all-reduce of 4 peers takes 6 hops of 10 ms (and a few bytes' transmission); one inner step
    # of 10 ms covered the first.
    assert last.exchange_seconds == pytest.approx(0.05 + 0.06, abs=1e-5)


def test_a_resumed_streaming_peer_takes_the_same_next_outer_step():
    settings = {"parts": 2, "streaming": Streaming(fragments=2), **PLAIN}
    straight = OuterSwarm(DRIFTS, rounds=3, **settings)
    run(straight.run())
    first = OuterSwarm(DRIFTS, rounds=2, **settings)
    run(first.run())
    saved = {peer: (learner.state(), first.protocols[peer].save_state()) for peer, learner in first.learners.items()}
    resumed = OuterSwarm(DRIFTS, rounds=3, **settings)
    for peer, (model, (tensors, meta)) in saved.items():
        resumed.learners[peer].load_state(model)
        resumed.protocols[peer].restore_state(tensors, meta)
    run(resumed.run(first_round=2))
    assert resumed.vectors() == straight.vectors()


def test_a_decaying_residual_carries_beta_of_what_the_codec_dropped():
    feedback = ErrorFeedback.parse("residual:0.5")
    total = feedback.with_residual({"x": torch.tensor([1.0, 0.4])})
    feedback.keep(total, {"x": torch.tensor([1.0, 0.0])})
    assert feedback.with_residual({"x": torch.tensor([0.0, 0.1])})["x"].tolist() == pytest.approx([0.0, 0.3])


def test_without_error_feedback_what_the_codec_dropped_is_lost():
    feedback = ErrorFeedback.parse("none")
    total = feedback.with_residual({"x": torch.tensor([1.0, 0.4])})
    feedback.keep(total, {"x": torch.tensor([1.0, 0.0])})
    assert feedback.with_residual({"x": torch.tensor([0.0, 0.1])})["x"].tolist() == pytest.approx([0.0, 0.1])


def test_a_failed_round_sends_its_pseudo_gradient_later_whatever_the_decay():
    feedback = ErrorFeedback.parse("none")
    feedback.hold(feedback.with_residual({"x": torch.tensor([2.0])}))
    assert feedback.with_residual({"x": torch.tensor([1.0])})["x"].tolist() == [3.0]


@pytest.mark.parametrize("spec", ["residual:2", "residual:x", "decay"])
def test_a_bad_error_feedback_is_refused_naming_the_forms_of_both_kinds(spec):
    with pytest.raises(ValueError, match="for pseudo-gradients: none, residual"):
        TrainingConfig(algorithm="diloco", error_feedback=spec)


def test_model_error_feedback_is_refused_for_pseudo_gradients_and_the_other_way_round():
    with pytest.raises(ValueError, match="compresses updates, whose error feedback is none, residual"):
        TrainingConfig(algorithm="diloco", codec="topk:0.1", error_feedback="choco")
    with pytest.raises(ValueError, match="compresses models, whose error feedback is none, choco"):
        TrainingConfig(algorithm="dpsgd", codec="topk:0.1", error_feedback="residual")


def test_a_lossy_codec_gets_a_residual_for_pseudo_gradients_and_choco_for_models():
    assert TrainingConfig(algorithm="diloco", codec="int8").error_feedback_spec == "residual"
    assert TrainingConfig(algorithm="dpsgd", codec="int8").error_feedback_spec == "choco"
    assert TrainingConfig(algorithm="diloco", codec="int8").gossip.error_feedback == "none"


def test_fragments_with_a_gossip_mix_are_refused():
    with pytest.raises(ValueError, match="give them with --outer-mix all"):
        TrainingConfig(algorithm="diloco", outer_mix="gossip:1", fragments=2)


def test_an_overlap_longer_than_a_round_is_refused():
    with pytest.raises(ValueError, match="more inner steps than a round has"):
        TrainingConfig(algorithm="diloco", local_steps=4, overlap=5)


def test_a_peer_killed_while_its_combination_travels_costs_the_others_nothing_but_itself():
    swarm = OuterSwarm(DRIFTS, rounds=2, local_steps=2, streaming=Streaming(overlap=1, keep=0.5), **PLAIN)

    async def kill_mid_exchange():
        for peer in swarm.ids:
            swarm.start(peer)
        await asyncio.sleep(0.025)  # round 0's all-reduce, sent at 0.02, lands at 0.08
        swarm.crash("p3")
        await swarm.run()

    run(kill_mid_exchange())
    # Round 0 averaged all four (start 6, as above); round 1 the three others: 6 - mean(3 - 2.5d) over d = 1, 2, 3.
    survivors = {peer: value for peer, value in swarm.values().items() if peer != "p3"}
    assert survivors == pytest.approx(dict.fromkeys(["p0", "p1", "p2"], 8.0))
    # Round 0 reports nothing heard yet (its combination was on its way); round 1 its own, without p3.
    assert [r.neighbours_heard for r in swarm.reports["p0"]] == [0, 2]
    assert swarm.protocols["p3"].pending.task.cancelled()


def test_more_fragments_than_the_models_tensors_are_refused_before_the_run():
    from peer.config import SimulationConfig
    from peer.errors import ConfigError
    from peer.simulate import simulate

    with pytest.raises(ConfigError, match="this model has 8; give at most 8"):
        simulate(SimulationConfig(algorithm="diloco", peers=2, rounds=1, fragments=9))
