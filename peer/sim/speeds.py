"""How fast each simulated peer computes: a spec for the whole swarm, drawn from the run's seed.

    same                 every peer takes --step-time per local step
    stragglers:F:X       a fraction F of the peers, chosen from the seed, is X times slower
    lognormal:SIGMA      each peer's step time is --step-time times exp(SIGMA z), z standard normal
    file:PATH            PATH lists each peer's seconds per local step: one number per line, one line per peer

Any of them may end in ``+jitter:J``: each local step then takes its peer's step time times a
factor drawn from a log-normal distribution of mean 1 and log-spread J, so no two iterations
take quite the same time. The factors and the jitter come from the seed: a run replays exactly.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

SPEEDS_HELP = "same, stragglers:F:X, lognormal:SIGMA or file:PATH, each optionally +jitter:J"


class SpeedError(ValueError):
    """A speeds spec that does not parse, or a speeds file that does not fit the swarm."""


@dataclass(frozen=True)
class Speeds:
    step_times: tuple[float, ...]  # simulated seconds per local step, by peer
    jitter: float = 0.0  # log-spread of each step's duration; 0: every step takes exactly its step time

    def slow(self) -> frozenset[int]:
        """The peers slower than the median one (none when all are equal): a run reports them apart."""
        ordered = sorted(self.step_times)
        median = ordered[(len(ordered) - 1) // 2]
        return frozenset(i for i, seconds in enumerate(self.step_times) if seconds > median * (1 + 1e-9))


def parse_speeds(spec: str, peers: int, step_time: float, seed: int) -> Speeds:
    """The step time of each of ``peers`` peers; SpeedError naming what is wrong and the valid forms."""
    base, plus, jitter_text = spec.strip().partition("+")
    jitter = _jitter(jitter_text, spec) if plus else 0.0
    name, _, args = base.partition(":")
    if name == "same" and not args:
        return Speeds((step_time,) * peers, jitter)
    if name == "stragglers":
        fraction, _, factor = args.partition(":")
        share, slowdown = _number(fraction, spec), _number(factor, spec)
        if not 0 <= share <= 1:
            raise SpeedError(f"--speeds {spec!r}: the fraction of stragglers must be in [0, 1], got {share:g}")
        if slowdown <= 0:
            raise SpeedError(f"--speeds {spec!r}: a straggler's slowdown must be > 0, got {slowdown:g}")
        slow = set(random.Random(f"{seed}:stragglers").sample(range(peers), round(share * peers)))
        return Speeds(tuple(step_time * (slowdown if i in slow else 1.0) for i in range(peers)), jitter)
    if name == "lognormal":
        sigma = _number(args, spec)
        if sigma < 0:
            raise SpeedError(f"--speeds {spec!r}: SIGMA must be >= 0, got {sigma:g}")
        draw = random.Random(f"{seed}:lognormal")
        return Speeds(tuple(step_time * math.exp(sigma * draw.gauss(0.0, 1.0)) for _ in range(peers)), jitter)
    if name == "file" and args:
        return Speeds(_read_file(Path(args), peers), jitter)
    raise SpeedError(f"unknown --speeds {spec[:80]!r}; valid: {SPEEDS_HELP}")


def _number(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SpeedError(f"--speeds {spec!r}: {text!r} is not a number; valid: {SPEEDS_HELP}") from None
    if not math.isfinite(value):
        raise SpeedError(f"--speeds {spec!r}: {text!r} is not a finite number")
    return value


def _jitter(text: str, spec: str) -> float:
    name, _, value = text.partition(":")
    if name != "jitter":
        raise SpeedError(f"--speeds {spec!r}: after '+' comes jitter:J (e.g. stragglers:0.25:4+jitter:0.1)")
    jitter = _number(value, spec)
    if jitter < 0:
        raise SpeedError(f"--speeds {spec!r}: jitter must be >= 0, got {jitter:g}")
    return jitter


def _read_file(path: Path, peers: int) -> tuple[float, ...]:
    try:
        lines = [(number, line.strip()) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise SpeedError(f"--speeds file:{path}: cannot be read ({getattr(error, 'strerror', None) or error})") from None
    if len(lines) != peers:
        raise SpeedError(
            f"--speeds file:{path} lists {len(lines)} step times for {peers} peers; give one number per line, one line per peer"
        )
    times = []
    for number, line in lines:
        try:
            seconds = float(line)
        except ValueError:
            raise SpeedError(f"--speeds file:{path} line {number}: {line[:40]!r} is not a number of seconds") from None
        if not (math.isfinite(seconds) and seconds > 0):
            raise SpeedError(f"--speeds file:{path} line {number}: seconds per step must be > 0, got {line[:40]!r}")
        times.append(seconds)
    return tuple(times)
