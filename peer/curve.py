"""A run's learning curve, and how long it took to reach a target accuracy.

A curve has one point per evaluated round: the test accuracy of the peers that evaluated
their model at that round (mean, min, max), the bytes all of them had sent by then, and the
time. Records may arrive in any order (simulated peers finish a round at different moments;
real peers write their own files), so the curve is built from per-round sums, in memory that
grows with the rounds, not with peers x rounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peer.metrics import RoundRecord


# What a curve can be drawn against: rounds completed, bytes sent by all peers, time.
X_AXES = ("round", "bytes", "time")


@dataclass(frozen=True)
class CurvePoint:
    round: int
    peers: int  # how many peers evaluated their model at this round
    mean_accuracy: float
    min_accuracy: float
    max_accuracy: float
    # From the start of the run to the end of this round: by every peer where a simulator
    # counted it (idle and crashed peers included), else by the peers that evaluated.
    bytes_sent: int
    seconds: float  # when the last of them finished the round: simulated, or wall seconds since the run began


@dataclass
class _Round:
    peers: int = 0
    accuracy_sum: float = 0.0
    min_accuracy: float = math.inf
    max_accuracy: float = -math.inf
    bytes_sent: int = 0
    swarm_bytes_sent: int | None = None
    latest: float = -math.inf  # the latest record's time: simulated, or Unix time for real peers


class CurveBuilder:
    """Adds records one by one, in any order; ``points()`` gives the curve so far."""

    def __init__(self) -> None:
        self._rounds: dict[int, _Round] = {}
        self.wall_clock = False  # True once a record carries a Unix time (real peers)
        # Real peers: the Unix time at which the earliest peer started its clock.
        self._origin = math.inf

    def add(self, record: RoundRecord) -> None:
        if record.wall_time is not None:
            self.wall_clock = True
            self._origin = min(self._origin, record.wall_time - record.virtual_time)
        if record.accuracy is None:
            return
        entry = self._rounds.setdefault(record.round, _Round())
        entry.peers += 1
        entry.accuracy_sum += record.accuracy
        entry.min_accuracy = min(entry.min_accuracy, record.accuracy)
        entry.max_accuracy = max(entry.max_accuracy, record.accuracy)
        entry.bytes_sent += record.bytes_sent
        if record.swarm_bytes_sent is not None:
            entry.swarm_bytes_sent = max(entry.swarm_bytes_sent or 0, record.swarm_bytes_sent)
        entry.latest = max(entry.latest, record.wall_time if record.wall_time is not None else record.virtual_time)

    def points(self) -> list[CurvePoint]:
        return [self._point(round_, entry) for round_, entry in sorted(self._rounds.items())]

    def point(self, round_: int) -> CurvePoint | None:
        """The point of one round as it stands (None before anyone evaluated it)."""
        entry = self._rounds.get(round_)
        return self._point(round_, entry) if entry else None

    def _point(self, round_: int, entry: _Round) -> CurvePoint:
        return CurvePoint(
            round=round_,
            peers=entry.peers,
            mean_accuracy=entry.accuracy_sum / entry.peers,
            min_accuracy=entry.min_accuracy,
            max_accuracy=entry.max_accuracy,
            bytes_sent=entry.bytes_sent if entry.swarm_bytes_sent is None else entry.swarm_bytes_sent,
            seconds=entry.latest - (self._origin if self.wall_clock else 0.0),
        )


def time_to_target(points: list[CurvePoint], target: float | None, *, wall_clock: bool) -> dict[str, float | int | None]:
    """The summary keys for the first round whose mean accuracy reached ``target``; nulls when it
    never did (or no target was asked for). ``rounds_to_target`` counts rounds completed."""
    reached = next((p for p in points if p.mean_accuracy >= target), None) if target is not None else None
    return {
        "target_accuracy": target,
        "rounds_to_target": reached.round + 1 if reached else None,
        "bytes_to_target": reached.bytes_sent if reached else None,
        ("wall_seconds_to_target" if wall_clock else "virtual_seconds_to_target"): reached.seconds if reached else None,
    }
