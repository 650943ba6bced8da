"""`peer swarm`: N real peer processes on this host over loopback, the first bootstrapping the others."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from peer.checkpoint import FILE as CHECKPOINT
from peer.checkpoint import read_model
from peer.config import SwarmConfig, TrainingConfig, fitted
from peer.curve import CurveBuilder, Target, time_to_target
from peer.errors import ConfigError
from peer.metrics import consensus_distance, prepare_out, write_json_atomic
from peer.net.access import load_swarm_key
from peer.runs import RunError, read_curve
from peer.sim.speeds import Speeds
from peer.summary import renamed
from peer.summary import summary as common_summary

ADDRESS_LINE = re.compile(r"others join with --initial-peers (.+)$")
STOP_GRACE_SECONDS = 30


class LocalSwarm:
    """Peer processes of one swarm on this host; each peer I writes to ``out/peer-I/``."""

    def __init__(self, config: SwarmConfig, out: Path, extra_args: tuple[str, ...] = ()):
        self.config = config
        # As in simulation, the settings are fitted to the swarm's size (a sample no larger than it).
        self.settings = fitted(config, config.peers)
        self.out = out
        self.name = config.swarm or f"local-{time.time_ns()}"
        self.processes: dict[int, subprocess.Popen] = {}
        self.slowdowns = config.slowdowns()
        self._common = self._training_arguments() + [
            "--swarm", self.name, "--shards", str(config.peers), "--join-timeout", str(config.join_timeout), *extra_args,
        ]
        if config.swarm_key:
            self._common += ["--swarm-key", str(config.swarm_key)]

    def _training_arguments(self) -> list[str]:
        args = []
        # Only the settings given: a peer has the same defaults, and some settings are refused when
        # given at all (a setting the protocol does not take, even at its default).
        settings = self.settings
        for name in TrainingConfig.model_fields:
            value = getattr(settings, name)
            if name == "local_steps" and settings.adaptive_steps:
                value = f"adaptive:{value}"
            if value is not None and name not in ("out", "overwrite", "adaptive_steps") and settings.given(name):
                args += [f"--{name.replace('_', '-')}", str(value)]
        return args

    def folder(self, index: int) -> Path:
        return self.out / f"peer-{index}"

    def start(self, index: int, *, shard: int, min_peers: int, resume: bool = False) -> None:
        """Start peer ``index``; with ``resume``, from the checkpoint in its folder (its log goes on)."""
        folder = self.folder(index)
        folder.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "peer.cli", "run", *self._common,
            "--shard", str(shard), "--min-peers", str(min_peers), "--out", str(folder),
        ]
        # The swarm has checked its folder (and --overwrite removed an earlier run) before any peer starts.
        command.append("--resume" if resume else "--overwrite")
        if self.config.peers - self.config.client_peers <= index < self.config.peers:
            command.append("--client-mode")
        if self.config.metrics_port is not None:
            command += ["--metrics-port", str(self.config.metrics_port + index)]
        if index < len(self.slowdowns) and self.slowdowns[index] != 1:
            command += ["--slowdown", repr(self.slowdowns[index])]
        # Every running peer can welcome a newcomer, not only the first, which may have left.
        initial_peers = [a for i in self.processes if self.processes[i].poll() is None for a in self._address(i)]
        if initial_peers:
            command += ["--initial-peers", *initial_peers]
        with open(folder / "log.txt", "a" if resume else "w") as log:
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
        """The multiaddrs peer ``index`` printed last (a resumed peer listens anew), or none yet."""
        found = []
        for line in (self.folder(index) / "log.txt").read_text().splitlines():
            if match := ADDRESS_LINE.search(line):
                found = match.group(1).split()
        return found

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
        """The highest round peer ``index`` recorded, or -1 (also while it has recorded none)."""
        metrics = self.folder(index) / "metrics.jsonl"
        try:
            text = metrics.read_text()
        except FileNotFoundError:
            return -1
        # A last line without its newline is still being written, and a resumed peer cuts its log
        # back to its checkpoint while we may be reading it.
        rounds = []
        for line in text.splitlines()[: text.count("\n")]:
            try:
                rounds.append(json.loads(line)["round"])
            except (ValueError, KeyError, TypeError):
                continue
        return max(rounds, default=-1)

    def rounds_done(self) -> int:
        """Peer-rounds done so far, out of peers x rounds.

        Where a round ends in one model, only the peers that hold it record it, so the swarm's
        progress is its highest round recorded by anyone, counted once for every peer.
        """
        if self.config.protocol.one_model:
            return len(self.processes) * (max((self.last_round(i) for i in self.processes), default=-1) + 1)
        return sum(self.last_round(index) + 1 for index in self.processes)

    def running(self) -> bool:
        return any(p.poll() is None for p in self.processes.values())

    def kill(self, index: int) -> None:
        """SIGKILL to the peer and everything it started: it vanishes without a word, as in a crash."""
        kill_group(self.processes[index])

    def stop(self) -> None:
        """Ask every running peer to leave (SIGINT: save and withdraw), then insist.

        A Ctrl-C meanwhile does not cut this short: the peers are writing their summaries and
        checkpoints, and the swarm's summary is written from them next."""
        previous = signal.signal(signal.SIGINT, _still_stopping) if _main_thread() else None
        try:
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
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def summaries(self) -> dict[int, dict]:
        found = {}
        for index in self.processes:
            path = self.folder(index) / "summary.json"
            if path.exists():
                found[index] = renamed(json.loads(path.read_text()))
        return found


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _still_stopping(signum: int, frame: object) -> None:
    print(
        f"peer swarm: stopping: the peers are saving (at most {STOP_GRACE_SECONDS} s), then the summary is written",
        file=sys.stderr, flush=True,
    )


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def final_accuracies(summaries: list[dict]) -> list[float]:
    """The swarm's final test accuracies: those of the peers that hold the run's final model (the
    last aggregate, the tokens' last models), or, where none holds one, every peer's last evaluation."""
    holders = [s for s in summaries if s.get("final_model")] or summaries
    return [s["mean_accuracy"] for s in holders if s["mean_accuracy"] is not None]


def accuracy_by_speed(swarm: LocalSwarm) -> dict[str, float | None]:
    """The mean final accuracy of the slow peers (slower than the median one) and of the others."""
    slow = Speeds(tuple(swarm.slowdowns)).slow()
    groups: dict[str, list[float]] = {"slow": [], "fast": []}
    for index, peer_summary in swarm.summaries().items():
        if peer_summary["mean_accuracy"] is not None:
            groups["slow" if index in slow else "fast"].append(peer_summary["mean_accuracy"])
    return {f"mean_accuracy_{group}": sum(values) / len(values) if values else None for group, values in groups.items()}


def run_swarm(config: SwarmConfig, on_progress: Callable[[int], None] | None = None) -> dict:
    if config.swarm_key:
        load_swarm_key(config.swarm_key)  # a bad key is one error here, not one per peer
    out = config.out or Path("runs") / time.strftime("swarm-%Y%m%d-%H%M%S")
    prepare_out(out, overwrite=config.overwrite)
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
    checkpoints = [swarm.folder(i) / CHECKPOINT for i in swarm.processes]
    states = [read_model(path) for path in checkpoints if path.exists()]
    files = [swarm.folder(i) / "metrics.jsonl" for i in swarm.processes]
    try:
        curve = read_curve([path for path in files if path.exists()], unrounded=not config.protocol.rounds_shared)
    except RunError as error:  # a damaged file: the rest of the summary still counts
        print(f"peer swarm: warning: {error}", file=sys.stderr)
        curve = CurveBuilder()
    points = curve.points()
    settings = swarm.settings
    summary = common_summary(
        settings, peers=config.peers, rounds_completed=max((s["rounds_completed"] for s in summaries), default=0),
        accuracies=final_accuracies(summaries), losses=[s["mean_loss"] for s in summaries if s["mean_loss"] is not None],
        bytes_sent=sum(s["bytes_sent_total"] for s in summaries),
        bytes_received=sum(s["bytes_received_total"] for s in summaries),
        rejected=sum(s["rejected_total"] for s in summaries),
        missed_exchanges=sum(s["missed_exchanges_total"] for s in summaries),
        local_steps=sum(s["local_steps_total"] for s in summaries), wall_seconds=time.perf_counter() - started,
        to_target=time_to_target(points, Target.of(config), wall_clock=True),
    )
    summary.update(
        peers_finished=sum(s["rounds_completed"] == config.rounds for s in summaries),
        failed_peers={f"peer-{i}": p.returncode for i, p in swarm.processes.items() if p.returncode != 0},
        consensus_distance=consensus_distance(states) if states else None,
        last_round=points[-1].round if points else None,  # the highest evaluated round recorded
        speeds=config.speeds,
        slowdowns=swarm.slowdowns,
        **accuracy_by_speed(swarm),
        interrupted=interrupted,
        out=str(out),
        **config.protocol.combine(summaries, settings),
    )
    write_json_atomic(out / "summary.json", summary)
    return summary
