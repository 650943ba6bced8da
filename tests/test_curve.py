"""Learning curves from records in any order, time to a target, and consensus distance per round."""

import dataclasses
import random

import pytest
import torch

from peer.curve import CurveBuilder, LatestAccuracies, Target, time_to_target
from peer.metrics import ConsensusByRound, RoundRecord, consensus_distance


def record(peer, round_, accuracy, *, sent=100, time=1.0, wall=None, loss=1.0):
    return RoundRecord(
        round=round_, peer=peer, accuracy=accuracy, loss=None if accuracy is None else loss, train_loss=1.0,
        bytes_sent=sent, bytes_received=sent, virtual_time=time, neighbours_expected=2, neighbours_heard=2,
        rejected=0, wall_time=wall,
    )


def test_points_aggregate_each_round_whatever_the_order_of_the_records():
    records = [
        record("a", 0, 0.2, sent=10, time=1.0), record("b", 0, 0.4, sent=20, time=1.5),
        record("a", 1, 0.6, sent=30, time=2.0), record("b", 1, 0.9, sent=40, time=2.7),
    ]
    for order in (records, records[::-1], [records[2], records[0], records[3], records[1]]):
        curve = CurveBuilder()
        for r in order:
            curve.add(r)
        first, second = curve.points()
        assert (first.round, first.peers, first.bytes_sent, first.seconds) == (0, 2, 30, 1.5)
        assert first.mean_accuracy == pytest.approx(0.3)
        assert (first.min_accuracy, first.max_accuracy) == (0.2, 0.4)
        assert (second.bytes_sent, second.seconds) == (70, 2.7)
        assert second.mean_accuracy == pytest.approx(0.75)


def test_a_simulators_count_of_every_peers_bytes_is_taken_as_it_is():
    curve = CurveBuilder()
    for peer, swarm in (("a", 500), ("b", 700)):
        curve.add(dataclasses.replace(record(peer, 0, 0.5, sent=10), swarm_bytes_sent=swarm))
    assert curve.points()[0].bytes_sent == 700
    assert curve.point(0) == curve.points()[0] and curve.point(1) is None


def test_rounds_that_were_not_evaluated_make_no_point():
    curve = CurveBuilder()
    for r in (record("a", 0, None), record("a", 1, 0.5), record("a", 2, None)):
        curve.add(r)
    assert [p.round for p in curve.points()] == [1]


def test_real_peers_time_counts_from_the_first_peers_start():
    curve = CurveBuilder()
    # Peer a started its clock at Unix time 1000, peer b at 1003.
    curve.add(record("a", 0, 0.5, time=4.0, wall=1004.0))
    curve.add(record("b", 0, 0.7, time=2.0, wall=1005.0))
    assert curve.wall_clock
    assert curve.points()[0].seconds == pytest.approx(5.0)


def test_time_to_target_is_the_first_round_whose_mean_reached_it():
    curve = CurveBuilder()
    for round_, accuracies in enumerate([(0.5, 0.6), (0.7, 0.95), (0.79, 0.79), (0.9, 0.9)]):
        for peer, accuracy in zip("ab", accuracies):
            curve.add(record(peer, round_, accuracy, sent=100 * (round_ + 1), time=10.0 * (round_ + 1)))
    points = curve.points()
    assert time_to_target(points, Target.of({"target_accuracy": 0.8}), wall_clock=False) == {
        "target_accuracy": 0.8, "target_loss": None, "rounds_to_target": 2, "bytes_to_target": 400,
        "virtual_seconds_to_target": 20.0,
    }
    assert time_to_target(points, Target.of({"target_accuracy": 0.95}), wall_clock=True) == {
        "target_accuracy": 0.95, "target_loss": None, "rounds_to_target": None, "bytes_to_target": None,
        "wall_seconds_to_target": None,
    }
    assert time_to_target(points, None, wall_clock=False)["rounds_to_target"] is None


def test_points_carry_the_mean_min_and_max_test_loss_of_the_round():
    curve = CurveBuilder()
    curve.add(record("a", 0, 0.5, loss=2.0))
    curve.add(record("b", 0, 0.7, loss=1.0))
    (point,) = curve.points()
    assert (point.mean_loss, point.min_loss, point.max_loss) == (1.5, 1.0, 2.0)


def test_a_round_whose_records_carry_no_loss_has_no_mean_loss_and_never_reaches_a_loss_target():
    curve = CurveBuilder()
    curve.add(dataclasses.replace(record("a", 0, 0.5), loss=None))  # a metrics file of an earlier version
    (point,) = curve.points()
    assert point.mean_loss is None and point.mean_accuracy == 0.5
    assert not Target("loss", 10.0, lower_is_better=True).reached(point)


def test_a_loss_target_is_reached_when_the_mean_loss_falls_to_it():
    curve = CurveBuilder()
    for round_, losses in enumerate([(2.0, 1.0), (1.0, 0.5), (0.5, 0.5), (0.25, 1.0)]):
        for peer, loss in zip("ab", losses):
            curve.add(record(peer, round_, 0.5, loss=loss, sent=100 * (round_ + 1), time=10.0 * (round_ + 1)))
    points = curve.points()
    target = Target.of({"target_accuracy": None, "target_loss": 0.75})
    assert target == Target("loss", 0.75, lower_is_better=True) and str(target) == "mean loss 0.75"
    # Round 0's mean loss is 1.5, above the target; round 1's is 0.75: at it is reached.
    assert time_to_target(points, target, wall_clock=False) == {
        "target_accuracy": None, "target_loss": 0.75, "rounds_to_target": 2, "bytes_to_target": 400,
        "virtual_seconds_to_target": 20.0,
    }
    assert time_to_target(points, Target.of({"target_loss": 0.3}), wall_clock=True) == {
        "target_accuracy": None, "target_loss": 0.3, "rounds_to_target": None, "bytes_to_target": None,
        "wall_seconds_to_target": None,
    }


def test_a_nan_mean_loss_never_reaches_a_loss_target():
    curve = CurveBuilder()
    curve.add(record("a", 0, 0.1, loss=float("nan")))
    assert not Target("loss", 1.0, lower_is_better=True).reached(curve.points()[0])


def test_a_target_is_read_from_settings_or_a_summary_and_none_when_neither_is_given():
    class Settings:
        target_accuracy, target_loss = None, 0.25

    assert Target.of(Settings()) == Target("loss", 0.25, lower_is_better=True)
    assert Target.of({"target_accuracy": 0.9, "target_loss": None}) == Target("accuracy", 0.9, lower_is_better=False)
    assert Target.of({"target_accuracy": None}) is None and Target.of({}) is None


def test_a_run_without_rounds_carries_the_peers_latest_losses():
    curve = LatestAccuracies(peers=2)
    curve.add(record("a", 0, 0.5, loss=2.0, time=1.0))
    assert curve.latest() is None  # b has not been evaluated yet
    curve.add(record("b", 0, 0.6, loss=1.0, time=2.0))
    curve.add(record("a", 1, 0.7, loss=0.5, time=3.0))
    latest = curve.latest()
    assert (latest.mean_loss, latest.min_loss, latest.max_loss) == (0.75, 0.5, 1.0)
    assert Target("loss", 0.75, lower_is_better=True).reached(latest)
    assert not Target("loss", 0.7, lower_is_better=True).reached(latest)


def test_consensus_by_round_matches_the_exact_distance_in_any_order():
    generator = torch.Generator().manual_seed(0)
    rounds = {r: [{"w": torch.randn(3, 4, generator=generator), "b": torch.randn(4, generator=generator)} for _ in range(5)]
              for r in range(3)}
    arrivals = [(r, state) for r, states in rounds.items() for state in states]
    random.Random(0).shuffle(arrivals)
    tracker = ConsensusByRound(peers=5)
    for r, state in arrivals:
        tracker.add(r, state)
    distances = dict(tracker.distances())
    for r, states in rounds.items():
        assert distances[r] == pytest.approx(consensus_distance(states), rel=1e-6)  # that one sums in float32


def test_identical_models_are_exactly_at_consensus_and_a_short_round_still_reports():
    tracker = ConsensusByRound(peers=3)
    state = {"w": torch.randn(100) * 1e3}
    for _ in range(3):
        tracker.add(0, {"w": state["w"].clone()})
    tracker.add(1, {"w": torch.zeros(2)})
    tracker.add(1, {"w": torch.tensor([2.0, 0.0])})  # the third peer skipped round 1
    assert tracker.distances() == [(0, 0.0), (1, 1.0)]
