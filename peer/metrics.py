"""Per-peer, per-round records (metrics.jsonl) and the run's summary (summary.json)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from gossip.learner import State
from gossip.mixing import average
from peer.curve import CurveBuilder, LatestAccuracies
from peer.errors import ConfigError


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
    local_steps: int = 0  # optimisation steps taken this round
    exchange_seconds: float = 0.0  # clock seconds spent exchanging models this round
    wall_time: float | None = None  # Unix time of the record on a real peer; None in simulation
    # Bytes sent by every peer of the swarm so far: known to a simulator, not to a real peer.
    swarm_bytes_sent: int | None = None
    # ||theta - theta*||^2 on evaluated rounds, for a task with an exact optimum (a convex one).
    squared_error: float | None = None


class MetricsLog:
    """Appends one JSON line per record; keeps the latest record of each peer and the run's curve."""

    def __init__(self, path: Path | None, curve: CurveBuilder | LatestAccuracies | None = None):
        self._file: TextIO | None = open(path, "w") if path else None
        self.latest: dict[str, RoundRecord] = {}
        self.missed_exchanges = 0  # neighbour models that did not arrive in time, over the run
        self.local_steps = 0  # by every peer, over the run
        self.curve = curve or CurveBuilder()
        self.bytes_written = 0  # the length of the file: what a checkpoint keeps of it

    @classmethod
    def resumed(cls, path: Path, kept_bytes: int, curve: CurveBuilder | LatestAccuracies | None = None) -> MetricsLog:
        """Go on with the log of a run that stopped: its first ``kept_bytes`` bytes are the rounds
        its checkpoint includes, and are counted again; what was written after them is dropped."""
        records, _ = kept_records(path, kept_bytes)
        os.truncate(path, kept_bytes)
        log = cls(None, curve)
        for record in records:
            log.write(record)
        log._file = open(path, "a")  # noqa: SIM115 - open for as long as the run goes on
        log.bytes_written = kept_bytes
        return log

    def write(self, record: RoundRecord) -> None:
        self.latest[record.peer] = record
        self.missed_exchanges += record.neighbours_expected - record.neighbours_heard
        self.local_steps += record.local_steps
        self.curve.add(record)
        if self._file:
            line = json.dumps(asdict(record)) + "\n"
            self._file.write(line)
            self.bytes_written += len(line.encode())
            self._file.flush()  # others follow a running peer's progress through this file

    def close(self) -> None:
        if self._file:
            self._file.close()


# What to do when a checkpoint and the log beside it do not agree.
START_AFRESH = "remove the checkpoint (or the folder) to start afresh, or start without --resume with another --out"


def kept_records(path: Path, kept_bytes: int) -> tuple[list[RoundRecord], RoundRecord | None]:
    """The records in the first ``kept_bytes`` bytes of the log at ``path`` (what a checkpoint keeps
    of it) and the first whole record after them (None when there is none: a line cut short by a
    crash is not one). ConfigError, naming the line, where ``kept_bytes`` is not the end of one of
    its lines or a line is damaged. It only reads, so a refused checkpoint costs no record."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"--resume: {path} is missing, and the checkpoint beside it keeps part of it; {START_AFRESH}"
        ) from None
    except OSError as error:
        raise ConfigError(f"--resume: cannot read {path} ({error.strerror or error})") from None
    if kept_bytes > len(data):
        raise ConfigError(
            f"--resume: the checkpoint keeps {kept_bytes} bytes of {path}, which holds only {len(data)}; {START_AFRESH}"
        )
    kept, rest = data[:kept_bytes], data[kept_bytes:]
    if kept and not kept.endswith(b"\n"):
        within = kept.count(b"\n") + 1
        raise ConfigError(
            f"--resume: the checkpoint keeps {kept_bytes} bytes of {path}, which end within line {within}; "
            f"{START_AFRESH}"
        )
    records = [_record(line, number, path) for number, line in enumerate(kept.split(b"\n")[:-1], 1)]
    following, newline, _ = rest.partition(b"\n")
    return records, _record(following, len(records) + 1, path) if newline else None


def _record(line: bytes, number: int, path: Path) -> RoundRecord:
    """Line ``number`` of the log at ``path``; ConfigError naming it when it is not a record."""
    try:
        record = RoundRecord(**json.loads(line))
        if type(record.round) is not int or record.round < 0:
            raise ValueError(f"round {record.round!r}")
    except (ValueError, TypeError) as error:
        raise ConfigError(f"--resume: {path} line {number} is damaged ({str(error)[:200]}); {START_AFRESH}") from None
    return record


# What a run leaves in its folder (a local swarm's peers each in peer-I/); --overwrite removes
# exactly these, never a file it does not know. A swarm's peer's log.txt is the swarm's to
# write: a fresh start writes it anew.
RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoint.safetensors", "run.png")


def prepare_out(folder: Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Create an output folder and check that it can be written, before any work goes into the run.

    A folder that holds an earlier run is refused unless the run goes on from it (``resume``) or
    replaces it (``overwrite``, which removes that run's files first): a slip of --out must not
    cut an earlier run's metrics or its checkpoint."""
    earlier = earlier_run(folder)
    if earlier and not (resume or overwrite):
        raise ConfigError(
            f"--out {folder} holds an earlier run ({', '.join(str(p.relative_to(folder)) for p in earlier[:3])}); "
            "give --resume to go on from it (peer run), --overwrite to replace it, or another --out"
        )
    if overwrite and not resume:
        for path in earlier:
            path.unlink(missing_ok=True)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ConfigError(
            f"--out {folder} cannot be written ({error.strerror or error}); choose a folder you can write to"
        ) from None


def earlier_run(folder: Path) -> list[Path]:
    """The files of a run that ``folder`` holds, its peers' folders' included."""
    places = [folder, *sorted(folder.glob("peer-*"))] if folder.is_dir() else []
    return [place / name for place in places for name in RUN_FILES if (place / name).is_file()]


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


class ConsensusByRound:
    """The consensus distance at each round, from each peer's model as it finishes the round.

    A running mean and sum of squared deviations per round (Welford's update, in float64), so
    identical models give exactly 0 and no round keeps more than one model-sized vector;
    a round is closed when all ``peers`` have reported (peers that skipped it close at the end;
    with ``peers`` None, when peers come and go, every round stays open until the end).
    """

    def __init__(self, peers: int | None):
        self.peers = peers
        self._open: dict[int, tuple[int, torch.Tensor, float]] = {}  # round: (count, mean, squared deviations)
        self._closed: dict[int, float] = {}

    def add(self, round_: int, state: State) -> None:
        x = torch.cat([t.detach().reshape(-1).double().cpu() for t in state.values() if t.is_floating_point()])
        count, mean, deviations = self._open.get(round_, (0, torch.zeros_like(x), 0.0))
        count += 1
        delta = x - mean
        mean = mean + delta / count
        deviations += float(delta @ (x - mean))
        if count == self.peers:
            del self._open[round_]
            self._closed[round_] = deviations / count
        else:
            self._open[round_] = (count, mean, deviations)

    def distances(self) -> list[tuple[int, float]]:
        """(round, distance) for every round reported so far, in round order."""
        pending = {round_: deviations / count for round_, (count, _, deviations) in self._open.items()}
        return sorted({**self._closed, **pending}.items())
