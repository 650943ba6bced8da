"""How much the simulator adds to the cost of training: a simulated D-PSGD run against the
same peers doing the same local steps and evaluations with no exchange, measured side by side.

Prints JSON. The overhead target is at most 10% (ratio <= 1.10).

    python scripts/bench_simulation_overhead.py [--repeats 3] [--rounds 100] [--peers 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from peer.config import SimulationConfig
from peer.simulate import build_trainers, simulate
from peer.tasks import load_task
from peer.trainer import resolve_device


def training_alone(config: SimulationConfig) -> float:
    """The same peers, steps and evaluations as the simulation, with no communication at all."""
    torch.set_num_threads(config.compute_threads(every_core=False))
    trainers = build_trainers(config, load_task(config.task, config.data_dir), resolve_device(config.device))
    started = time.perf_counter()
    for round_ in range(config.rounds):
        for trainer in trainers:
            trainer.train(config.local_steps)
            if round_ == config.rounds - 1 or (round_ + 1) % config.eval_every == 0:
                trainer.evaluate()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--topology", default="ring")
    args = parser.parse_args()
    config = SimulationConfig(
        peers=args.peers, topology=args.topology, algorithm="dpsgd", task="mnist1d",
        partition="dirichlet:0.5", rounds=args.rounds, local_steps=args.local_steps, seed=0, engine="per-peer",
    )
    training_alone(config.model_copy(update={"rounds": 5}))  # warm caches and the allocator before timing
    alone, simulated, outside_compute = [], [], []
    for _ in range(args.repeats):  # interleaved, so that drift in machine load hits both alike
        alone.append(training_alone(config))
        result = simulate(config)
        simulated.append(result.summary["wall_seconds"])
        # Within the same run: wall time over the time spent in training and evaluation.
        outside_compute.append(result.summary["wall_seconds"] / result.compute_wall_seconds)
    ratios = [s / a for s, a in zip(simulated, alone)]
    print(json.dumps({
        "benchmark": "simulation_overhead",
        "peers": config.peers, "topology": config.topology, "rounds": config.rounds,
        "local_steps": config.local_steps, "task": config.task, "threads": config.compute_threads(every_core=False),
        "machine": platform.machine(), "cpus": os.cpu_count(),
        "training_alone_seconds": alone,
        "simulation_seconds": simulated,
        "ratio_per_repeat": ratios,
        "ratio_median": statistics.median(ratios),
        "overhead_percent_median": 100 * (statistics.median(ratios) - 1),
        "wall_over_compute_in_run": outside_compute,
        "in_run_overhead_percent_median": 100 * (statistics.median(outside_compute) - 1),
        "target_ratio_max": 1.10,
    }, indent=2))


if __name__ == "__main__":
    main()
