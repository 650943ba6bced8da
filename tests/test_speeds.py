"""Per-peer speeds in the simulator: the specs, their errors, and the clock that charges them."""

from __future__ import annotations

import asyncio
import math
import statistics

import pytest

from peer.sim import SimClock, SpeedProfile, VirtualTimeLoop
from peer.sim.speeds import SpeedError, Speeds, parse_speeds


def test_same_gives_every_peer_the_step_time_and_no_slow_peers():
    speeds = parse_speeds("same", 5, 0.02, seed=1)
    assert speeds == Speeds((0.02,) * 5, 0.0)
    assert speeds.slow() == frozenset()


def test_stragglers_are_a_fraction_chosen_from_the_seed_and_are_the_slow_peers():
    speeds = parse_speeds("stragglers:0.25:4", 16, 0.01, seed=3)
    slow = [i for i, seconds in enumerate(speeds.step_times) if seconds == pytest.approx(0.04)]
    assert len(slow) == 4 and sum(seconds == 0.01 for seconds in speeds.step_times) == 12
    assert speeds.slow() == frozenset(slow)
    assert parse_speeds("stragglers:0.25:4", 16, 0.01, seed=3) == speeds
    assert parse_speeds("stragglers:0.25:4", 16, 0.01, seed=4) != speeds


def test_lognormal_factors_spread_with_sigma_and_replay_for_a_seed():
    speeds = parse_speeds("lognormal:0.5", 400, 1.0, seed=0)
    logs = [math.log(seconds) for seconds in speeds.step_times]
    assert statistics.pstdev(logs) == pytest.approx(0.5, rel=0.15)
    assert speeds == parse_speeds("lognormal:0.5", 400, 1.0, seed=0)
    assert len(speeds.slow()) == 200  # strictly slower than the lower median
    assert parse_speeds("lognormal:0", 3, 0.1, seed=0).step_times == (0.1, 0.1, 0.1)


def test_a_file_lists_each_peers_seconds_per_step(tmp_path):
    path = tmp_path / "speeds.txt"
    path.write_text("0.01\n\n0.04\n0.01\n")
    speeds = parse_speeds(f"file:{path}+jitter:0.2", 3, 99.0, seed=0)
    assert speeds == Speeds((0.01, 0.04, 0.01), 0.2)
    assert speeds.slow() == frozenset({1})


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("fast", "unknown --speeds"),
        ("stragglers:0.25:0", "slowdown must be > 0"),
        ("stragglers:0.25:-2", "slowdown must be > 0"),
        ("stragglers:1.5:4", "fraction of stragglers"),
        ("stragglers:x:4", "is not a number"),
        ("lognormal:-1", "SIGMA must be >= 0"),
        ("lognormal:nan", "not a finite number"),
        ("same+jitter:-0.1", "jitter must be >= 0"),
        ("same+wobble:1", "comes jitter:J"),
        ("same:3", "unknown --speeds"),
    ],
)
def test_bad_specs_are_refused_with_the_reason(spec, words):
    with pytest.raises(SpeedError, match=words):
        parse_speeds(spec, 4, 0.01, seed=0)


@pytest.mark.parametrize(
    ("text", "words"),
    [("0.1\n0.2\n", "lists 2 step times for 3 peers"), ("0.1\nfast\n0.2\n", "line 2: 'fast' is not a number"),
     ("0.1\n0\n0.2\n", "line 2: seconds per step must be > 0"), ("0.1\ninf\n0.2\n", "must be > 0")],
)
def test_a_speeds_file_that_does_not_fit_is_refused(tmp_path, text, words):
    path = tmp_path / "speeds.txt"
    path.write_text(text)
    with pytest.raises(SpeedError, match=words):
        parse_speeds(f"file:{path}", 3, 0.01, seed=0)
    with pytest.raises(SpeedError, match="cannot be read"):
        parse_speeds(f"file:{tmp_path / 'missing.txt'}", 3, 0.01, seed=0)


def test_the_clock_charges_steps_times_the_step_time_and_jitter_averages_to_it():
    async def elapsed(clock: SimClock, steps: int) -> float:
        started = clock.now()
        await clock.compute(lambda: None, steps=steps)
        return clock.now() - started

    def run(clock: SimClock, steps: int, times: int) -> list[float]:
        with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
            return [runner.run(elapsed(clock, steps)) for _ in range(times)]

    assert run(SimClock(SpeedProfile(0.04)), 10, 3) == [pytest.approx(0.4)] * 3
    jittered = run(SimClock(SpeedProfile(0.04, jitter=0.3), seed="a"), 10, 400)
    assert len(set(jittered)) == 400
    assert statistics.mean(jittered) == pytest.approx(0.4, rel=0.03)
    assert run(SimClock(SpeedProfile(0.04, jitter=0.3), seed="a"), 10, 400) == jittered
    assert run(SimClock(SpeedProfile(0.04, jitter=0.3), seed="b"), 10, 400) != jittered
