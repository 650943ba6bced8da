"""The real workloads, side by side: for each task, one peer on all the data, FedAvg, and D-PSGD.

For each task of --tasks (cifar10: 16 peers, Dirichlet(0.5) over the labels, a ring;
shakespeare: 8 peers holding whole speakers, a ring), three simulations with the task's own
model and optimiser:

- ``reference``: ``--peers 1``, one peer on all the training data, taking as many local steps
  as the whole swarm takes together (peers x rounds x local steps): the same compute;
- ``fedavg``: every peer trains, a server averages them each round;
- ``dpsgd``: every peer trains and averages with its ring neighbours each round.

Each row: final mean test accuracy and loss (every peer's model at the end), the rounds, bytes
and wall seconds until the target (the mean over the evaluated peers; null if never), the
whole run's wall seconds, peer-steps per second (local steps, all peers, per wall second of the
whole run, evaluation included) and the fraction of this machine's matrix-product FLOP rate
that this training reached (FLOPs of a step x peer-steps / wall seconds, over a float32
matmul's rate on the same threads, measured before and after the runs). Prints JSON; --plot
writes each task's curves (accuracy, and loss for a loss target) against simulated time to
FOLDER/TASK.png; the reference computes as fast as the whole swarm, so equal times are equal compute.

    python scripts/bench_tasks.py --data-dir ../shared/data [--tasks cifar10 shakespeare] [--plot runs/tasks]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from peer.config import SimulationConfig, usable_cores
from peer.flops import matmul_flop_rate
from peer.plot import plot_runs
from peer.runs import load_run
from peer.simulate import simulate

# What each task's swarm runs; a target accuracy or a target loss per task.
TASKS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "peers": 16, "partition": "dirichlet:0.5", "topology": "ring", "rounds": 120, "local_steps": 10,
        "batch_size": 32, "target_accuracy": 0.6, "eval_every": 5, "eval_peers": 4, "eval_samples": 2000,
    },
    "shakespeare": {
        "peers": 8, "partition": "natural", "topology": "ring", "rounds": 25, "local_steps": 10,
        "batch_size": 12, "target_loss": 2.2, "eval_every": 5, "eval_peers": 2,
    },
}
SCENARIOS = ("reference", "fedavg", "dpsgd")


def settings_for(task: str, scenario: str, args: argparse.Namespace) -> dict[str, Any]:
    settings = {**TASKS[task], "task": task, "data_dir": args.data_dir, "seed": args.seed}
    if args.rounds:
        settings["rounds"] = args.rounds
    if scenario == "reference":
        # One peer takes the swarm's steps, all peers together; it is evaluated as often per step.
        swarm = settings.pop("peers")
        settings.update(
            peers=1, partition="iid", rounds=settings["rounds"] * swarm, eval_every=settings["eval_every"] * swarm,
            # As fast as the whole swarm together, so that simulated time compares equal compute.
            step_time=SimulationConfig.model_fields["step_time"].default / swarm,
        )
        settings.pop("eval_peers", None)
        settings.pop("topology")
    else:
        settings["algorithm"] = scenario
    if scenario == "fedavg":
        # Its round ends in one model, evaluated once: no topology, no sample of peers to evaluate.
        settings.pop("topology")
        settings.pop("eval_peers", None)
    return settings


def run(settings: dict[str, Any], folder: Path) -> dict[str, Any]:
    started = time.perf_counter()
    recorded: dict[int, float] = {}  # wall seconds from the start to each round's last record

    def note(record) -> None:
        recorded[record.round] = time.perf_counter() - started

    summary = simulate(SimulationConfig(**settings, out=folder, overwrite=True), on_record=note).summary
    wall = time.perf_counter() - started
    reached = summary["rounds_to_target"]
    return {
        "peers": summary["peers"],
        "steps_per_peer": summary["rounds_completed"] * summary["local_steps"],
        "mean_accuracy": summary["mean_accuracy"],
        "mean_loss": summary["mean_loss"],
        "rounds_to_target": summary["rounds_to_target"],
        "bytes_to_target": summary["bytes_to_target"],
        "wall_seconds_to_target": None if reached is None else round(recorded[reached - 1], 1),
        "bytes_sent": summary["bytes_sent_total"],
        "wall_seconds": round(wall, 1),
        "peer_steps": summary["peer_steps"],
        "peer_steps_per_second": round(summary["peer_steps"] / wall, 2),
        "flops_per_step": summary["flops_per_step"],
        "engine": summary["engine"],
        "threads": summary["threads"],
        "eval_peers": summary["eval_peers"],
        "eval_samples": summary["eval_samples"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--data-dir", type=Path, default=None, help="folder holding cifar10/ and tinyshakespeare/")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the swarms (default: each task's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=None, help="write FOLDER/TASK.png, the curves of each task")
    args = parser.parse_args()
    threads = usable_cores()
    torch.set_num_threads(threads)
    rate_before = matmul_flop_rate(torch.device("cpu"))
    results: dict[str, Any] = {"threads": threads, "tasks": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for task in args.tasks:
            rows, folders = {}, []
            for scenario in args.scenarios:
                folder = Path(scratch) / f"{task}-{scenario}"
                rows[scenario] = run(settings_for(task, scenario, args), folder)
                folders.append(folder)
                print(json.dumps({task: {scenario: rows[scenario]}}), file=sys.stderr, flush=True)
            results["tasks"][task] = {"settings": TASKS[task], "runs": rows}
            if args.plot:
                _plot(task, [load_run(folder) for folder in folders], args.plot)
    torch.set_num_threads(threads)
    rate = (rate_before + matmul_flop_rate(torch.device("cpu"))) / 2
    results["matmul_gflops"] = round(rate / 1e9, 1)
    for task in results["tasks"].values():
        for row in task["runs"].values():
            row["flop_fraction"] = round(row["flops_per_step"] * row["peer_steps_per_second"] / rate, 3)
    print(json.dumps(results, indent=2))


def _plot(task: str, runs: list, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    plot_runs(runs, folder / f"{task}.png", x="time")
    if TASKS[task].get("target_loss") is not None:
        plot_runs(runs, folder / f"{task}-loss.png", x="time", y="loss")


if __name__ == "__main__":
    main()
