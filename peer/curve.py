"""A run's learning curve, and how long it took to reach its target accuracy or loss.

A run in rounds has one point per evaluated round: the test accuracy and loss of the peers that
evaluated their model at that round (mean, min, max), the bytes all of them had sent by then, and
the time. Records may arrive in any order (simulated peers finish a round at different moments;
real peers write their own files), so the curve is built from per-round sums, in memory that
grows with the rounds, not with peers x rounds.

A run without rounds (asynchronous gossip, where each peer is at its own iteration) has one
point per evaluation instead: the peers' latest accuracies and losses at that moment (see
``LatestAccuracies``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peer.metrics import RoundRecord


# What a curve can be drawn against: rounds completed, bytes sent by all peers, time.
X_AXES = ("round", "bytes", "time")
# What a curve shows, and whether lower is better: each is also a target a run can be given
# (--target-accuracy, --target-loss).
METRICS = {"accuracy": False, "loss": True}


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
    # Their test loss; None where no record carried one (a metrics file of an earlier version).
    mean_loss: float | None = None
    min_loss: float | None = None
    max_loss: float | None = None


@dataclass(frozen=True)
class Target:
    """The target of a run: the mean over the peers of ``metric`` ("accuracy" or "loss") at
    ``value``, reached at or above it, or at or below it where lower is better."""

    metric: str
    value: float
    lower_is_better: bool

    @classmethod
    def of(cls, settings: Any) -> Target | None:
        """The target that a run's settings, or its summary (a mapping), give; None when none does."""
        for metric, lower_is_better in METRICS.items():
            key = f"target_{metric}"
            value = settings.get(key) if isinstance(settings, Mapping) else getattr(settings, key, None)
            if value is not None:
                return cls(metric, value, lower_is_better)
        return None

    def __str__(self) -> str:
        return f"mean {self.metric} {self.value:g}"

    def reached(self, point: CurvePoint | None) -> bool:
        mean = None if point is None else getattr(point, f"mean_{self.metric}")
        if mean is None or math.isnan(mean):
            return False
        return mean <= self.value if self.lower_is_better else mean >= self.value


@dataclass
class _Round:
    peers: int = 0
    accuracy_sum: float = 0.0
    min_accuracy: float = math.inf
    max_accuracy: float = -math.inf
    losses: int = 0  # the records that carried a test loss
    loss_sum: float = 0.0
    min_loss: float = math.inf
    max_loss: float = -math.inf
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
        if record.loss is not None:
            entry.losses += 1
            entry.loss_sum += record.loss
            entry.min_loss = min(entry.min_loss, record.loss)
            entry.max_loss = max(entry.max_loss, record.loss)
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
            mean_loss=entry.loss_sum / entry.losses if entry.losses else None,
            min_loss=entry.min_loss if entry.losses else None,
            max_loss=entry.max_loss if entry.losses else None,
        )


class LatestAccuracies:
    """The curve of a run without rounds: at each evaluation, the mean, min and max over the
    peers of each one's latest accuracy (and loss), from the moment every peer has been evaluated once.

    Records must come in time order (a simulation writes them so; ``peer.runs`` sorts a real
    swarm's). A point's round is the iteration every peer has reached, and its bytes those sent
    until then; points at the same moment are one.
    """

    def __init__(self, peers: int) -> None:
        self.peers = peers  # the peers to wait for before the first point
        self.wall_clock = False
        self._origin = math.inf
        self._accuracy: dict[str, float] = {}
        self._loss: dict[str, float] = {}
        self._iteration: dict[str, int] = {}
        self._bytes: dict[str, int] = {}
        self._points: list[CurvePoint] = []  # their seconds are the records' own: Unix time for real peers

    def add(self, record: RoundRecord) -> None:
        if record.wall_time is not None:
            self.wall_clock = True
            self._origin = min(self._origin, record.wall_time - record.virtual_time)
        self._bytes[record.peer] = record.bytes_sent
        if record.accuracy is None:
            return
        self._accuracy[record.peer] = record.accuracy
        if record.loss is not None:
            self._loss[record.peer] = record.loss
        self._iteration[record.peer] = record.round
        if len(self._accuracy) < self.peers:
            return
        accuracies, losses = list(self._accuracy.values()), list(self._loss.values())
        at = record.wall_time if record.wall_time is not None else record.virtual_time
        point = CurvePoint(
            round=min(self._iteration.values()),
            peers=len(accuracies),
            mean_accuracy=sum(accuracies) / len(accuracies),
            min_accuracy=min(accuracies),
            max_accuracy=max(accuracies),
            bytes_sent=record.swarm_bytes_sent if record.swarm_bytes_sent is not None else sum(self._bytes.values()),
            seconds=at,
            mean_loss=sum(losses) / len(losses) if losses else None,
            min_loss=min(losses, default=None),
            max_loss=max(losses, default=None),
        )
        if self._points and self._points[-1].seconds == at:
            self._points.pop()
        self._points.append(point)

    def points(self) -> list[CurvePoint]:
        return [self._from_start(point) for point in self._points]

    def latest(self) -> CurvePoint | None:
        return self._from_start(self._points[-1]) if self._points else None

    def _from_start(self, point: CurvePoint) -> CurvePoint:
        return replace(point, seconds=point.seconds - self._origin) if self.wall_clock else point


def time_to_target(
    points: list[CurvePoint], target: Target | None, *, wall_clock: bool
) -> dict[str, float | int | None]:
    """The summary keys for the first round whose mean accuracy or loss reached ``target``; nulls
    when it never did (or no target was asked for). ``rounds_to_target`` counts rounds completed."""
    reached = next((p for p in points if target.reached(p)), None) if target is not None else None
    given = {f"target_{metric}": None for metric in METRICS}
    if target is not None:
        given[f"target_{target.metric}"] = target.value
    return {
        **given,
        "rounds_to_target": reached.round + 1 if reached else None,
        "bytes_to_target": reached.bytes_sent if reached else None,
        ("wall_seconds_to_target" if wall_clock else "virtual_seconds_to_target"): reached.seconds if reached else None,
    }
