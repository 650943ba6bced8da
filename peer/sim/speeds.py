"""How fast each simulated peer computes: a spec for the whole swarm, drawn from the run's seed.

    same                 every peer takes --step-time per local step
    stragglers:F:X       a fraction F of the peers, chosen from the seed, is X times slower
    lognormal:SIGMA      each peer's step time is --step-time times exp(SIGMA z), z standard normal
    file:PATH            PATH lists each peer's seconds per local step: one number per line, one line per peer

Any of them may end in ``+jitter:J``: each local step then takes its peer's step time times a
factor drawn from a log-normal distribution of mean 1 and log-spread J, so no two iterations
take quite the same time. The factors and the jitter come from the seed: a run replays exactly.

``PeerSpec`` and the draws below are shared with ``links.py``, whose ``--bandwidths`` takes the
same forms.
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
class PeerSpec:
    """A spec that gives each peer a value, as given on the command line: its errors name the flag,
    the spec and its valid forms."""

    flag: str
    spec: str
    valid: str
    error: type[ValueError]

    def refused(self, reason: str) -> ValueError:
        return self.error(f"{self.flag} {self.spec!r}: {reason}")

    def unknown(self) -> ValueError:
        return self.error(f"unknown {self.flag} {self.spec[:80]!r}; valid: {self.valid}")

    def number(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise self.refused(f"{text!r} is not a number; valid: {self.valid}") from None
        if not math.isfinite(value):
            raise self.refused(f"{text!r} is not a finite number")
        return value

    def share(self, text: str, who: str) -> float:
        """A fraction of the peers, in [0, 1]."""
        share = self.number(text)
        if not 0 <= share <= 1:
            raise self.refused(f"the fraction of {who} must be in [0, 1], got {share:g}")
        return share

    def sigma(self, text: str) -> float:
        sigma = self.number(text)
        if sigma < 0:
            raise self.refused(f"SIGMA must be >= 0, got {sigma:g}")
        return sigma

    def file_lines(self, path: Path, peers: int, listed: str, form: str) -> list[tuple[int, str]]:
        """The non-blank lines of a file with one line per peer, with their numbers; ``listed`` names
        what a line holds (``step times``), ``form`` how to write one."""
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise self.file_error(path, f"cannot be read ({getattr(error, 'strerror', None) or error})") from None
        lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
        if len(lines) != peers:
            counted = f"lists {len(lines)} {listed} for {peers} peers"
            raise self.error(f"{self.flag} file:{path} {counted}; {form}, one line per peer")
        return lines

    def file_error(self, path: Path, reason: str, line: int | None = None) -> ValueError:
        where = f"file:{path}" if line is None else f"file:{path} line {line}"
        return self.error(f"{self.flag} {where}: {reason}")


def chosen(key: str, peers: int, share: float) -> frozenset[int]:
    """``share`` of ``peers`` peers, drawn from ``key`` (the run's seed and what they are chosen for)."""
    return frozenset(random.Random(key).sample(range(peers), round(share * peers)))


def lognormal_factors(key: str, peers: int, sigma: float) -> tuple[float, ...]:
    """exp(SIGMA z) for each peer, z standard normal, drawn from ``key``."""
    draw = random.Random(key)
    return tuple(math.exp(sigma * draw.gauss(0.0, 1.0)) for _ in range(peers))


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
    given = PeerSpec("--speeds", spec, SPEEDS_HELP, SpeedError)
    base, plus, jitter_text = spec.strip().partition("+")
    jitter = _jitter(given, jitter_text) if plus else 0.0
    name, _, args = base.partition(":")
    if name == "same" and not args:
        return Speeds((step_time,) * peers, jitter)
    if name == "stragglers":
        fraction, _, factor = args.partition(":")
        share, slowdown = given.share(fraction, "stragglers"), given.number(factor)
        if slowdown <= 0:
            raise given.refused(f"a straggler's slowdown must be > 0, got {slowdown:g}")
        slow = chosen(f"{seed}:stragglers", peers, share)
        return Speeds(tuple(step_time * (slowdown if i in slow else 1.0) for i in range(peers)), jitter)
    if name == "lognormal":
        factors = lognormal_factors(f"{seed}:lognormal", peers, given.sigma(args))
        return Speeds(tuple(step_time * factor for factor in factors), jitter)
    if name == "file" and args:
        return Speeds(_read_file(given, Path(args), peers), jitter)
    raise given.unknown()


def _jitter(given: PeerSpec, text: str) -> float:
    name, _, value = text.partition(":")
    if name != "jitter":
        raise given.refused("after '+' comes jitter:J (e.g. stragglers:0.25:4+jitter:0.1)")
    jitter = given.number(value)
    if jitter < 0:
        raise given.refused(f"jitter must be >= 0, got {jitter:g}")
    return jitter


def _read_file(given: PeerSpec, path: Path, peers: int) -> tuple[float, ...]:
    times = []
    for number, line in given.file_lines(path, peers, "step times", "give one number per line"):
        try:
            seconds = float(line)
        except ValueError:
            raise given.file_error(path, f"{line[:40]!r} is not a number of seconds", number) from None
        if not (math.isfinite(seconds) and seconds > 0):
            raise given.file_error(path, f"seconds per step must be > 0, got {line[:40]!r}", number)
        times.append(seconds)
    return tuple(times)
