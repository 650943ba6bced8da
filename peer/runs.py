"""Reading a finished (or running) run back from its folder: its summary and its curve.

A run folder is what ``peer simulate --out``, ``peer run --out`` or ``peer swarm --out`` wrote:
``summary.json`` and either ``metrics.jsonl`` or, for a swarm, ``peer-*/metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from gossip.protocols import registered_as
from peer.curve import CurveBuilder, CurvePoint, LatestAccuracies
from peer.metrics import RoundRecord
from peer.summary import renamed


class RunError(ValueError):
    """A run folder that cannot be read; the message says which file and what to do."""


_RECORD = TypeAdapter(RoundRecord)
_RECORD_KEYS = {f.name for f in fields(RoundRecord)}
_FIX = "pass a folder written by peer simulate --out, peer run --out or peer swarm --out"


@dataclass(frozen=True)
class Run:
    folder: Path
    summary: dict[str, Any]
    points: list[CurvePoint]
    wall_clock: bool  # time is wall seconds (real peers), not simulated seconds
    consensus: list[tuple[int, float]]  # (round, consensus distance), where the run recorded it


def metrics_files(folder: Path) -> list[Path]:
    """A run's metrics files: its own, or its peers' for a swarm; RunError when there is none."""
    own = folder / "metrics.jsonl"
    found = [own] if own.is_file() else sorted(folder.glob("peer-*/metrics.jsonl"))
    if not found:
        raise RunError(f"{folder} has no metrics.jsonl (nor peer-*/metrics.jsonl): {_FIX}")
    return found


def read_records(path: Path) -> Iterator[RoundRecord]:
    """The records of one metrics file; a malformed line is a RunError naming the file and line."""
    try:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                # A last line without its newline is being written, or was cut off by a crash.
                if line.strip() and line.endswith("\n"):
                    yield _parse(line, path, number)
    except OSError as error:
        raise RunError(f"cannot read {path}: {error.strerror or error}") from None


def _parse(line: str, path: Path, number: int) -> RoundRecord:
    where = f"{path} line {number} is not a metrics record"
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        raise RunError(f"{where} (not JSON: {error.msg}); the file is damaged, rerun or remove that line") from None
    if not isinstance(data, dict):
        raise RunError(f"{where} (a JSON {type(data).__name__}, not an object); the file is damaged")
    try:
        # Keys a later version may add are ignored; the ones we read must be right.
        record = _RECORD.validate_python({k: v for k, v in data.items() if k in _RECORD_KEYS})
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(map(str, first["loc"])) or "record"
        raise RunError(f"{where} ({field}: {first['msg']}); the file is damaged") from None
    if record.accuracy is not None and not 0 <= record.accuracy <= 1:
        raise RunError(f"{where} (accuracy {record.accuracy} is outside [0, 1]); the file is damaged")
    if not all(math.isfinite(x) for x in (record.virtual_time, record.wall_time or 0.0)):
        raise RunError(f"{where} (a time that is not a finite number); the file is damaged")
    return record


def load_run(folder: Path) -> Run:
    if not folder.is_dir():
        raise RunError(f"{folder} is not a folder: {_FIX}")
    summary_path = folder / "summary.json"
    try:
        summary = json.loads(summary_path.read_text())
    except FileNotFoundError:
        raise RunError(f"{folder} has no summary.json: {_FIX} (a run writes it when it ends)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunError(f"{summary_path} cannot be read ({error}); rerun, or remove that folder from the list") from None
    if not isinstance(summary, dict):
        raise RunError(f"{summary_path} is not a JSON object; rerun, or remove that folder from the list")
    summary = renamed(summary)
    protocol = registered_as(str(summary.get("algorithm")))
    curve = read_curve(
        metrics_files(folder), unrounded=protocol is not None and not protocol.rounds_shared,
        peers=summary.get("eval_peers"),
    )
    return Run(folder, summary, curve.points(), curve.wall_clock, _consensus(summary, summary_path))


def read_curve(paths: list[Path], *, unrounded: bool = False, peers: int | None = None) -> CurveBuilder | LatestAccuracies:
    """The curve of every record in these metrics files (``unrounded``: of a run without rounds,
    whose first point waits for ``peers`` peers to have evaluated: the --eval-peers sample, or by
    default every peer in the files); RunError when one cannot be read."""
    if not unrounded:
        curve = CurveBuilder()
        for path in paths:
            for record in read_records(path):
                curve.add(record)
        return curve
    # Each peer's file is in its own time order; the curve needs the swarm's.
    records = sorted(
        (record for path in paths for record in read_records(path)),
        key=lambda r: r.wall_time if r.wall_time is not None else r.virtual_time,
    )
    unrounded_curve = LatestAccuracies(peers or len({record.peer for record in records}))
    for record in records:
        unrounded_curve.add(record)
    return unrounded_curve


def _consensus(summary: dict[str, Any], path: Path) -> list[tuple[int, float]]:
    raw = summary.get("consensus_by_round") or []
    try:
        return [(int(round_), float(distance)) for round_, distance in raw]
    except (TypeError, ValueError):
        raise RunError(f"{path}: consensus_by_round is not a list of [round, distance] pairs") from None
