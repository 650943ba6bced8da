"""`peer swarm`: N real peer processes on this host over loopback, the first bootstrapping the others."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file

from peer.config import ConfigError, SwarmConfig, TrainingConfig
from peer.curve import CurveBuilder, time_to_target
from peer.metrics import consensus_distance, prepare_out, write_json_atomic
from peer.runs import RunError, read_curve

ADDRESS_LINE = re.compile(r"others join with --initial-peers (.+)$")
STOP_GRACE_SECONDS = 30


class LocalSwarm:
    """Peer processes of one swarm on this host; each peer I writes to ``out/peer-I/``."""

    def __init__(self, config: SwarmConfig, out: Path, extra_args: tuple[str, ...] = ()):
        self.config = config
        self.out = out
        self.name = config.swarm or f"local-{time.time_ns()}"
        self.processes: dict[int, subprocess.Popen] = {}
        self._common = self._training_arguments() + [
            "--swarm", self.name, "--shards", str(config.peers), "--join-timeout", str(config.join_timeout), *extra_args,
        ]

    def _training_arguments(self) -> list[str]:
        args = []
        for name in TrainingConfig.model_fields:
            value = getattr(self.config, name)
            if value is not None and name != "out":
                args += [f"--{name.replace('_', '-')}", str(value)]
        return args

    def folder(self, index: int) -> Path:
        return self.out / f"peer-{index}"

    def start(self, index: int, *, shard: int, min_peers: int) -> None:
        folder = self.folder(index)
        folder.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "peer.cli", "run", *self._common,
            "--shard", str(shard), "--min-peers", str(min_peers), "--out", str(folder),
        ]
        if self.config.metrics_port is not None:
            command += ["--metrics-port", str(self.config.metrics_port + index)]
        # Every running peer can welcome a newcomer, not only the first, which may have left.
        initial_peers = [a for i in self.processes if self.processes[i].poll() is None for a in self._address(i)]
        if initial_peers:
            command += ["--initial-peers", *initial_peers]
        with open(folder / "log.txt", "w") as log:
            # A session of its own, so that the peer's DHT process and p2p daemon can be killed with it.
            self.processes[index] = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def bootstrap(self) -> None:
        """Start every peer: the first one, and once it has printed its address, the others."""
        self.start(0, shard=0, min_peers=self.config.peers)
        self._wait_for_address(0)
        for index in range(1, self.config.peers):
            self.start(index, shard=index, min_peers=self.config.peers)

    def _address(self, index: int) -> list[str]:
        """The multiaddrs peer ``index`` printed, or none yet."""
        for line in (self.folder(index) / "log.txt").read_text().splitlines():
            if match := ADDRESS_LINE.search(line):
                return match.group(1).split()
        return []

    def _wait_for_address(self, index: int) -> list[str]:
        log, process = self.folder(index) / "log.txt", self.processes[index]
        deadline = time.monotonic() + self.config.join_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ConfigError(f"peer {index} exited with code {process.returncode}; see {log}")
            if address := self._address(index):
                return address
            time.sleep(0.2)
        raise ConfigError(f"peer {index} did not announce its address within {self.config.join_timeout:g} s; see {log}")

    def last_round(self, index: int) -> int:
        """The last round peer ``index`` recorded, or -1."""
        metrics = self.folder(index) / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return json.loads(lines[-1])["round"] if lines else -1

    def rounds_done(self) -> int:
        return sum(self.last_round(index) + 1 for index in self.processes)

    def running(self) -> bool:
        return any(p.poll() is None for p in self.processes.values())

    def kill(self, index: int) -> None:
        """SIGKILL to the peer and everything it started: it vanishes without a word, as in a crash."""
        kill_group(self.processes[index])

    def stop(self) -> None:
        """Ask every running peer to leave (SIGINT: save and withdraw), then insist."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            kill_group(process)  # whatever the peer left behind (nothing, when it left cleanly)

    def summaries(self) -> dict[int, dict]:
        found = {}
        for index in self.processes:
            path = self.folder(index) / "summary.json"
            if path.exists():
                found[index] = json.loads(path.read_text())
        return found


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def run_swarm(config: SwarmConfig, on_progress: Callable[[int], None] | None = None) -> dict:
    out = config.out or Path("runs/swarm")
    prepare_out(out)
    swarm = LocalSwarm(config, out)
    started = time.perf_counter()
    interrupted = False
    try:
        swarm.bootstrap()
        while swarm.running():
            if on_progress:
                on_progress(swarm.rounds_done())
            time.sleep(0.5)
    except KeyboardInterrupt:
        interrupted = True  # the peers are asked to save and leave below; their results still count
    finally:
        swarm.stop()
    summaries = list(swarm.summaries().values())
    checkpoints = [swarm.folder(i) / "checkpoint.safetensors" for i in swarm.processes]
    states = [load_file(str(path)) for path in checkpoints if path.exists()]
    accuracies = [s["accuracy"] for s in summaries if s["accuracy"] is not None]
    files = [swarm.folder(i) / "metrics.jsonl" for i in swarm.processes]
    try:
        curve = read_curve([path for path in files if path.exists()])
    except RunError as error:  # a damaged file: the rest of the summary still counts
        print(f"peer swarm: warning: {error}", file=sys.stderr)
        curve = CurveBuilder()
    gossip = config.gossip_settings()
    summary = {
        "algorithm": config.algorithm,
        "task": config.task,
        "topology": config.topology,
        "partition": config.partition,
        "peers": config.peers,
        "rounds": config.rounds,
        "local_steps": config.local_steps,
        "seed": config.seed,
        "mixing": config.mixing,
        "gossip_steps": config.gossip_steps,
        "codec": gossip.codec,
        "error_feedback": gossip.error_feedback,
        "peers_finished": sum(s["rounds_completed"] == config.rounds for s in summaries),
        "failed_peers": {f"peer-{i}": p.returncode for i, p in swarm.processes.items() if p.returncode != 0},
        "mean_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
        "min_accuracy": min(accuracies, default=None),
        "max_accuracy": max(accuracies, default=None),
        "consensus_distance": consensus_distance(states) if states else None,
        "bytes_sent_total": sum(s["bytes_sent"] for s in summaries),
        "rejected_total": sum(s["rejected"] for s in summaries),
        "missed_exchanges_total": sum(s["missed_exchanges"] for s in summaries),
        "interrupted": interrupted,
        "wall_seconds": time.perf_counter() - started,
        **time_to_target(curve.points(), config.target_accuracy, wall_clock=True),
    }
    write_json_atomic(out / "summary.json", summary)
    return summary
