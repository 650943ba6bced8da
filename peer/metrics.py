"""Per-peer, per-round records (metrics.jsonl) and the run's summary (summary.json)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from gossip.mixing import average


@dataclass(frozen=True)
class RoundRecord:
    round: int
    peer: str
    accuracy: float | None  # None on rounds that were not evaluated
    loss: float | None
    train_loss: float
    bytes_sent: int  # cumulative since the start of the run
    bytes_received: int
    virtual_time: float
    neighbours_expected: int
    neighbours_heard: int
    rejected: int


class MetricsLog:
    """Appends one JSON line per record; keeps the latest record of each peer for the summary."""

    def __init__(self, path: Path | None):
        self._file: TextIO | None = open(path, "w") if path else None
        self.latest: dict[str, RoundRecord] = {}
        self.missed_exchanges = 0  # neighbour models that did not arrive in time, over the run

    def write(self, record: RoundRecord) -> None:
        self.latest[record.peer] = record
        self.missed_exchanges += record.neighbours_expected - record.neighbours_heard
        if self._file:
            self._file.write(json.dumps(asdict(record)) + "\n")
            self._file.flush()  # others follow a running peer's progress through this file

    def close(self) -> None:
        if self._file:
            self._file.close()


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def consensus_distance(states: list[dict[str, torch.Tensor]]) -> float:
    """Mean over peers of the squared distance between a peer's model and the average model."""
    mean = average(states)
    return sum(
        sum(float((state[name] - mean[name]).pow(2).sum()) for name in mean) for state in states
    ) / len(states)
