"""Outer-optimizer training side by side: synchronous averaging, D-PSGD and DiLoCo's mixes, at equal
inner steps per peer.

For each task of --tasks (shakespeare: 8 peers holding whole speakers; cifar10: 16 peers,
Dirichlet(0.5) over the labels), simulations that each take --steps inner steps per peer with the
task's own optimiser (AdamW for the GPT, SGD for the ResNet):

- ``sync``: the pseudo-gradients averaged after every step (H = 1, outer SGD with lr 1 and no
  momentum): every step's update is the swarm's mean, the all-reduce baseline;
- ``dpsgd-H``: D-PSGD on a ring, H local steps per round (about DiLoCo's bytes at the same H);
- ``diloco-H`` for H in --intervals: DiLoCo, the mean over all peers, Nesterov (0.7, 0.9);
- ``gossip-1``: NoLoCo, random pairs each round, at H = --gossip-interval;
- ``neighbours``: the same outer update with a ring's Metropolis weights, same H.

Each row: final mean test loss and accuracy, bytes sent per peer, the rounds, bytes per peer and
simulated seconds until the target (null if never reached), and the loss and bytes relative to
``sync``. Prints JSON; --plot writes each task's loss against bytes per peer and against
simulated time to FOLDER/TASK-bytes.png and FOLDER/TASK-time.png.

    python scripts/bench_outer.py --data-dir ../shared/data [--tasks shakespeare cifar10] [--plot runs/outer]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from peer.config import SimulationConfig
from peer.plot import plot_runs
from peer.runs import load_run
from peer.simulate import simulate

TASKS: dict[str, dict[str, Any]] = {
    "shakespeare": {
        "peers": 8, "partition": "natural", "batch_size": 12, "target_loss": 2.2, "eval_peers": 2,
        "eval_samples": 1000,
    },
    "cifar10": {
        "peers": 16, "partition": "dirichlet:0.5", "batch_size": 32, "target_accuracy": 0.4, "eval_peers": 4,
        "eval_samples": 2000,
    },
}
EVALUATIONS = 10  # evaluated rounds per run, about: at the same inner steps in every run


def scenarios(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each scenario's own settings: its algorithm and its rounds of H local steps."""
    gossip = args.gossip_interval
    found: dict[str, dict[str, Any]] = {
        "sync": {"algorithm": "diloco", "local_steps": 1, "outer_optimizer": "sgd", "outer_lr": 1.0, "outer_momentum": 0.0},
        f"dpsgd-{gossip}": {"algorithm": "dpsgd", "local_steps": gossip, "topology": "ring"},
    }
    for interval in args.intervals:
        found[f"diloco-{interval}"] = {"algorithm": "diloco", "local_steps": interval}
    found["gossip-1"] = {"algorithm": "diloco", "outer_mix": "gossip:1", "local_steps": gossip}
    found["neighbours"] = {"algorithm": "diloco", "outer_mix": "neighbours", "topology": "ring", "local_steps": gossip}
    return {name: s for name, s in found.items() if not args.scenarios or name in args.scenarios}


def settings_for(task: str, scenario: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    rounds = max(1, args.steps // scenario["local_steps"])
    return {
        **TASKS[task], **scenario, "task": task, "data_dir": args.data_dir, "seed": args.seed, "rounds": rounds,
        "eval_every": max(1, rounds // EVALUATIONS),
    }


def run(settings: dict[str, Any], folder: Path) -> dict[str, Any]:
    started = time.perf_counter()
    summary = simulate(SimulationConfig(**settings, out=folder, overwrite=True)).summary
    peers = summary["peers"]
    bytes_to_target = summary["bytes_to_target"]
    return {
        "steps_per_peer": summary["rounds_completed"] * summary["local_steps"],
        "local_steps": summary["local_steps"],
        "mean_loss": summary["mean_loss"],
        "mean_accuracy": summary["mean_accuracy"],
        "bytes_per_peer": summary["bytes_sent_total"] // peers,
        "rounds_to_target": summary["rounds_to_target"],
        "bytes_per_peer_to_target": None if bytes_to_target is None else bytes_to_target // peers,
        "seconds_to_target": summary["virtual_seconds_to_target"],
        "simulated_seconds": summary["virtual_seconds"],
        "consensus_distance": summary.get("consensus_distance"),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def relative_to_sync(rows: dict[str, dict[str, Any]]) -> None:
    """Each row's loss over sync's, and how many times fewer bytes per peer it sent."""
    sync = rows.get("sync")
    if sync is None:
        return
    for row in rows.values():
        row["loss_vs_sync"] = round(row["mean_loss"] / sync["mean_loss"], 4)
        row["bytes_fewer_than_sync"] = round(sync["bytes_per_peer"] / max(row["bytes_per_peer"], 1), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--data-dir", type=Path, default=None, help="folder holding cifar10/ and tinyshakespeare/")
    parser.add_argument("--steps", type=int, default=500, help="inner steps per peer in every run (default 500)")
    parser.add_argument("--intervals", type=int, nargs="+", default=[10, 50, 100], help="DiLoCo's H values")
    parser.add_argument("--gossip-interval", type=int, default=50, help="H of gossip-1, neighbours and D-PSGD")
    parser.add_argument("--scenarios", nargs="+", default=None, help="run only these (names as in the output)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=None, help="write FOLDER/TASK-bytes.png and FOLDER/TASK-time.png")
    args = parser.parse_args()
    results: dict[str, Any] = {"steps_per_peer": args.steps, "tasks": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for task in args.tasks:
            rows, folders = {}, []
            for name, scenario in scenarios(args).items():
                folder = Path(scratch) / f"{task}-{name}"
                rows[name] = run(settings_for(task, scenario, args), folder)
                folders.append(folder)
                print(json.dumps({task: {name: rows[name]}}), file=sys.stderr, flush=True)
            relative_to_sync(rows)
            results["tasks"][task] = {"settings": TASKS[task], "runs": rows}
            if args.plot:
                _plot(task, [load_run(folder) for folder in folders], args.plot)
    print(json.dumps(results, indent=2))


def _plot(task: str, runs: list, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    y = "loss" if TASKS[task].get("target_loss") is not None else "accuracy"
    plot_runs(runs, folder / f"{task}-bytes.png", x="bytes", y=y, log_x=True)
    plot_runs(runs, folder / f"{task}-time.png", x="time", y=y)


if __name__ == "__main__":
    main()
