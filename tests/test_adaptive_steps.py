"""Local work in proportion to speed."""

from __future__ import annotations

import pytest

from gossip.adaptive_steps import FADE, AdaptiveSteps


def test_a_peer_takes_the_most_steps_until_it_has_measured_itself():
    pace = AdaptiveSteps(10)
    assert pace.steps() == 10 and pace.fastest() is None
    pace.heard(400.0)
    assert pace.steps() == 10


def test_a_peer_four_times_slower_than_the_fastest_takes_a_quarter_of_the_steps():
    pace = AdaptiveSteps(12)
    pace.measured(12, 0.48)  # 25 steps per second
    pace.heard(100.0 / FADE)  # a neighbour knows of a peer at 100
    assert pace.fastest() == pytest.approx(100.0)
    assert pace.steps() == 3


def test_the_fastest_peer_takes_the_most_and_the_slowest_at_least_one():
    fast = AdaptiveSteps(10)
    fast.measured(10, 0.1)
    fast.heard(50.0)
    assert fast.steps() == 10 and fast.fastest() == 100.0
    crawling = AdaptiveSteps(10)
    crawling.measured(10, 100.0)
    crawling.heard(1e12)  # a liar, or a very fast peer: one step per iteration, never fewer
    assert crawling.steps() == 1


def test_a_fast_peer_that_left_fades_out_of_what_the_others_report():
    a, b = AdaptiveSteps(10), AdaptiveSteps(10)
    a.measured(10, 1.0)
    b.measured(10, 1.0)
    a.heard(1000.0)  # once, from a peer that then left
    for _ in range(600):  # a and b keep passing each other's report on
        a_reports, b_reports = a.fastest(), b.fastest()
        a.heard(b_reports)
        b.heard(a_reports)
    assert a.fastest() == pytest.approx(10.0) and b.fastest() == pytest.approx(10.0)
    assert a.steps() == 10


def test_speed_is_smoothed_and_a_measurement_of_no_time_is_ignored():
    pace = AdaptiveSteps(10)
    pace.measured(10, 1.0)
    pace.measured(10, 0.0)
    pace.measured(0, 1.0)
    assert pace.own == 10.0
    pace.measured(10, 0.5)
    assert 10.0 < pace.own < 20.0
    with pytest.raises(ValueError, match="at least 1"):
        AdaptiveSteps(0)
