"""Each simulated peer's links: their bandwidths (``--bandwidths``), and when each link is busy.

Every peer has an uplink, shared by everything it sends, and a downlink, shared by everything it
receives. ``--link-bandwidth`` (Mbit/s) is what each of them carries, and ``--bandwidths`` says how
that varies between peers, drawn from the run's seed like ``--speeds``:

    same             every peer's uplink and downlink carry --link-bandwidth
    slow:F:X         a fraction F of the peers, chosen from the seed, has links X times slower
    lognormal:SIGMA  each peer's links carry --link-bandwidth times exp(SIGMA z), z standard normal
    file:PATH        PATH lists each peer's bandwidths in Mbit/s, one line per peer: UP, or UP DOWN
"""

from __future__ import annotations

import math
from bisect import insort
from dataclasses import dataclass
from pathlib import Path

from peer.sim.speeds import PeerSpec, chosen, lognormal_factors

BANDWIDTHS_HELP = "same, slow:F:X, lognormal:SIGMA or file:PATH (one line per peer: UP or UP DOWN, in Mbit/s)"
MBIT = 1e6 / 8  # bytes per second in one Mbit/s


class BandwidthError(ValueError):
    """A bandwidths spec that does not parse, or a bandwidths file that does not fit the swarm."""


@dataclass(frozen=True)
class Bandwidths:
    up: tuple[float, ...]  # Mbit/s, by peer
    down: tuple[float, ...]


def parse_bandwidths(spec: str, peers: int, mbits: float, seed: int) -> Bandwidths:
    """The uplink and downlink of each of ``peers`` peers, around ``mbits`` Mbit/s; BandwidthError
    naming what is wrong and the valid forms."""
    given = PeerSpec("--bandwidths", spec, BANDWIDTHS_HELP, BandwidthError)
    name, _, args = spec.strip().partition(":")
    if name == "same" and not args:
        return _symmetric((mbits,) * peers)
    if name == "slow":
        fraction, _, factor = args.partition(":")
        share, slowdown = given.share(fraction, "slow peers"), given.number(factor)
        if slowdown <= 0:
            raise given.refused(f"a slow peer's slowdown must be > 0, got {slowdown:g}")
        slow = chosen(f"{seed}:slow-links", peers, share)
        return _symmetric(tuple(mbits / slowdown if i in slow else mbits for i in range(peers)))
    if name == "lognormal":
        factors = lognormal_factors(f"{seed}:lognormal-links", peers, given.sigma(args))
        return _symmetric(tuple(mbits * factor for factor in factors))
    if name == "file" and args:
        return _read_file(given, Path(args), peers)
    raise given.unknown()


def _symmetric(mbits: tuple[float, ...]) -> Bandwidths:
    return Bandwidths(mbits, mbits)


def _read_file(given: PeerSpec, path: Path, peers: int) -> Bandwidths:
    up, down = [], []
    for number, line in given.file_lines(path, peers, "bandwidths", "give UP or UP DOWN in Mbit/s per line"):
        fields = line.split()
        if len(fields) > 2:
            raise given.file_error(path, f"{line[:40]!r} has {len(fields)} numbers; give UP or UP DOWN", number)
        rates = [_rate(given, path, number, field) for field in fields]
        up.append(rates[0])
        down.append(rates[-1])
    return Bandwidths(tuple(up), tuple(down))


def _rate(given: PeerSpec, path: Path, number: int, field: str) -> float:
    try:
        mbits = float(field)
    except ValueError:
        raise given.file_error(path, f"{field[:40]!r} is not a number of Mbit/s", number) from None
    if not (math.isfinite(mbits) and mbits > 0):
        raise given.file_error(path, f"a bandwidth must be > 0 Mbit/s, got {field[:40]!r}", number)
    return mbits


class Schedule:
    """When one link is busy: its reservations, in time order, none overlapping."""

    def __init__(self) -> None:
        self._busy: list[tuple[float, float]] = []

    def forget_before(self, now: float) -> None:
        """Drop the reservations over by ``now``: no transfer can start in the past."""
        over = 0
        while over < len(self._busy) and self._busy[over][1] <= now:
            over += 1
        del self._busy[:over]

    def free_after(self, now: float) -> float:
        """When everything reserved so far is through."""
        return max(now, self._busy[-1][1]) if self._busy else now

    def first_gap(self, earliest: float, duration: float) -> float:
        """The earliest start, from ``earliest`` on, of a free stretch ``duration`` long.

        A transfer waits only for those that hold the link when it could start, not for those
        queued after it: a message whose sender is busy for a while does not hold up the others."""
        start = earliest
        for begin, end in self._busy:
            if start + duration <= begin:
                break
            start = max(start, end)
        return start

    def reserve(self, start: float, duration: float) -> float:
        """Hold the link from ``start`` for ``duration`` seconds (a stretch that is free); when that ends."""
        if duration > 0:
            insort(self._busy, (start, start + duration))
        return start + duration
