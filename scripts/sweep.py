"""Run simulations side by side and read their learning curves (shared by the benchmark scripts)."""

from __future__ import annotations

import argparse
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from peer.config import ConfigError, SimulationConfig, build_config
from peer.curve import CurvePoint
from peer.runs import load_run
from peer.simulate import simulate


def check_settings(parser: argparse.ArgumentParser, settings: list[dict]) -> None:
    """Every run's settings checked before the first run starts: a bad one is an error now, not an hour in."""
    for each in settings:
        try:
            build_config(SimulationConfig, {}, each)
        except ConfigError as error:
            parser.error(str(error))


def run(settings: dict, out: Path | None = None) -> dict:
    """One simulation evaluated every round: its summary (with the target keys when ``settings``
    has a ``target_accuracy``) and its curve. The run's folder is kept at ``out`` when given."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = out or Path(scratch)
        summary = simulate(SimulationConfig(**settings, out=folder, eval_every=1)).summary
        return {"summary": summary, "curve": load_run(folder).points}


def run_all(settings: list[dict], jobs: int, outs: list[Path | None] | None = None) -> list[dict]:
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(run, settings, outs or [None] * len(settings)))


def accuracy_at_bytes(curve: list[CurvePoint], budget: int) -> float | None:
    """Mean accuracy after the last round whose bytes, all peers together, stayed within ``budget``."""
    within = [point.mean_accuracy for point in curve if point.bytes_sent <= budget]
    return round(within[-1], 4) if within else None
