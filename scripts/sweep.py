"""Run simulations side by side and read their learning curves (shared by the benchmark scripts)."""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from peer.config import SimulationConfig
from peer.simulate import simulate


def run(settings: dict) -> dict:
    """One simulation evaluated every round: its summary and its curve of (round, mean accuracy, bytes sent)."""
    with tempfile.TemporaryDirectory() as out:
        summary = simulate(SimulationConfig(**settings, out=Path(out), eval_every=1)).summary
        rounds: dict[int, list[dict]] = defaultdict(list)
        for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            rounds[record["round"]].append(record)
    curve = [
        (round_, sum(r["accuracy"] for r in records) / len(records), sum(r["bytes_sent"] for r in records))
        for round_, records in sorted(rounds.items())
    ]
    return {"summary": summary, "curve": curve}


def run_all(settings: list[dict], jobs: int) -> list[dict]:
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(run, settings))


def rounds_to(curve: list[tuple[int, float, int]], target: float) -> int | None:
    """Rounds completed when the mean accuracy first reached ``target``; None if it never did."""
    return next((round_ + 1 for round_, accuracy, _ in curve if accuracy >= target), None)


def bytes_to(curve: list[tuple[int, float, int]], target: float) -> int | None:
    return next((sent for _, accuracy, sent in curve if accuracy >= target), None)


def accuracy_at_bytes(curve: list[tuple[int, float, int]], budget: int) -> float | None:
    """Mean accuracy after the last round whose bytes, all peers together, stayed within ``budget``."""
    within = [accuracy for _, accuracy, sent in curve if sent <= budget]
    return round(within[-1], 4) if within else None
