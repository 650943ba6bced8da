"""`peer swarm`: N real peer processes on this host over loopback, the first bootstrapping the others."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from peer.config import ConfigError, SwarmConfig, TrainingConfig
from peer.metrics import write_json_atomic

ADDRESS_LINE = re.compile(r"others join with --initial-peers (.+)$")
STOP_GRACE_SECONDS = 30


def peer_arguments(config: SwarmConfig) -> list[str]:
    """The training flags every peer process gets, from the swarm's settings."""
    args = []
    for name in TrainingConfig.model_fields:
        value = getattr(config, name)
        if value is None or name == "out":
            continue
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def _wait_for_address(log: Path, process: subprocess.Popen, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigError(f"the first peer exited with code {process.returncode}; see {log}")
        for line in log.read_text().splitlines():
            if match := ADDRESS_LINE.search(line):
                return match.group(1).split()
        time.sleep(0.2)
    raise ConfigError(f"the first peer did not announce its address within {timeout:g} s; see {log}")


def _rounds_done(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.exists() else 0


def run_swarm(config: SwarmConfig, on_progress: Callable[[int], None] | None = None) -> dict:
    out = config.out or Path("runs/swarm")
    swarm = config.swarm or f"local-{time.time_ns()}"
    common = peer_arguments(config) + ["--swarm", swarm, "--shards", str(config.peers), "--min-peers", str(config.peers)]
    processes: list[subprocess.Popen] = []
    folders = [out / f"peer-{i}" for i in range(config.peers)]
    started = time.perf_counter()

    def start(index: int, initial_peers: list[str]) -> None:
        folders[index].mkdir(parents=True, exist_ok=True)
        log = open(folders[index] / "log.txt", "w")
        command = [sys.executable, "-m", "peer.cli", "run", *common, "--shard", str(index), "--out", str(folders[index])]
        if initial_peers:
            command += ["--initial-peers", *initial_peers]
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

    try:
        start(0, [])
        addresses = _wait_for_address(folders[0] / "log.txt", processes[0], config.join_timeout)
        for index in range(1, config.peers):
            start(index, addresses)
        while any(p.poll() is None for p in processes):
            if on_progress:
                on_progress(sum(_rounds_done(folder) for folder in folders))
            time.sleep(0.5)
    finally:
        _stop(processes)
    failed = {folders[i].name: p.returncode for i, p in enumerate(processes) if p.returncode != 0}
    summaries = [json.loads((f / "summary.json").read_text()) for f in folders if (f / "summary.json").exists()]
    accuracies = [s["accuracy"] for s in summaries if s["accuracy"] is not None]
    summary = {
        "algorithm": config.algorithm,
        "task": config.task,
        "topology": config.topology,
        "partition": config.partition,
        "peers": config.peers,
        "rounds": config.rounds,
        "seed": config.seed,
        "peers_finished": sum(s["rounds_completed"] == config.rounds for s in summaries),
        "failed_peers": failed,
        "mean_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
        "min_accuracy": min(accuracies, default=None),
        "max_accuracy": max(accuracies, default=None),
        "bytes_sent_total": sum(s["bytes_sent"] for s in summaries),
        "rejected_total": sum(s["rejected"] for s in summaries),
        "missed_exchanges_total": sum(s["missed_exchanges"] for s in summaries),
        "wall_seconds": time.perf_counter() - started,
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


def _stop(processes: list[subprocess.Popen]) -> None:
    """Ask every running peer to leave (SIGINT: save and withdraw), then insist."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
