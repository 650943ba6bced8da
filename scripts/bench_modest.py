"""MoDeST against FedAvg and D-PSGD: rounds, bytes and simulated time to a target accuracy, and faults.

Two groups of simulations on MNIST-1D, each configuration evaluated every round:

- ``sampling``: 64 peers, IID and Dirichlet(0.5), at most 150 rounds, each run ending when its
  mean accuracy reaches the target: FedAvg sampling S = 8 peers a round, MoDeST with S = 8 and
  A = 1 and 2 aggregators, and D-PSGD on the one-peer exponential graph and on the ring. Ratios:
  MoDeST's rounds over FedAvg's, and D-PSGD's bytes over MoDeST's, both to the target.
- ``faults``: 100 peers, S = 10, 100 rounds: MoDeST with A = 2 with no fault and with 80% of the
  peers crashing at round 30, and with A = 1 under the same crash. The crash takes 80% of the
  training data with it: on the default MNIST-1D (4,000 training sequences) the 20 survivors
  hold 800, too few to learn as well from, so the group also runs on a larger MNIST-1D
  (``--fault-tasks``), where the survivors still hold enough.

With ``--plot FILE`` the IID runs of the sampling group are drawn against the bytes sent.

    python scripts/bench_modest.py [--groups sampling faults] [--jobs 2] [--target 0.6] [--plot FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from sweep import run_all

SAMPLING = [
    {"algorithm": "fedavg", "sample_size": 8},
    {"algorithm": "modest", "sample_size": 8, "aggregators": 1},
    {"algorithm": "modest", "sample_size": 8, "aggregators": 2},
    {"algorithm": "dpsgd", "topology": "onepeer-exponential"},
    {"algorithm": "dpsgd", "topology": "ring"},
]
FAULTS = [
    {"aggregators": 2, "faults": "none"},
    {"aggregators": 2, "faults": "crash:0.8@30"},
    {"aggregators": 1, "faults": "crash:0.8@30"},
]
SHOWN = ("algorithm", "task", "topology", "partition", "sample_size", "aggregators", "faults")


def row(summary: dict) -> dict:
    return {
        **{key: summary[key] for key in SHOWN if summary.get(key) is not None},
        "rounds_to_target": summary["rounds_to_target"],
        "bytes_to_target": summary["bytes_to_target"],
        "virtual_seconds_to_target": summary["virtual_seconds_to_target"],
        "rounds_completed": summary["rounds_completed"],
        "final_accuracy": summary["mean_accuracy"],
        "virtual_seconds": round(summary["virtual_seconds"], 1),
        "wall_seconds": round(summary["wall_seconds"], 1),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 2) if numerator and denominator else None


def sampling_report(rows: list[dict]) -> dict:
    by = {(r["algorithm"], r.get("topology"), r.get("aggregators")): r for r in rows}
    fedavg, modest = by[("fedavg", "server", None)], by[("modest", "sampled", 1)]
    return {
        "rows": rows,
        "modest_a1_rounds_over_fedavg": ratio(modest["rounds_to_target"], fedavg["rounds_to_target"]),
        "onepeer_exponential_bytes_over_modest_a1": ratio(
            by[("dpsgd", "onepeer-exponential", None)]["bytes_to_target"], modest["bytes_to_target"]
        ),
        "ring_bytes_over_modest_a1": ratio(by[("dpsgd", "ring", None)]["bytes_to_target"], modest["bytes_to_target"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", nargs="+", choices=["sampling", "faults"], default=["sampling", "faults"])
    parser.add_argument("--jobs", type=int, default=2, help="simulations run side by side")
    parser.add_argument("--target", type=float, default=0.6, help="mean test accuracy to reach")
    parser.add_argument("--rounds", type=int, default=150, help="at most this many rounds in the sampling group")
    parser.add_argument("--fault-tasks", nargs="+", default=["mnist1d", "mnist1d:50000"], help="tasks of the faults group")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, help="draw the IID runs of the sampling group against bytes sent")
    args = parser.parse_args()
    common = {"task": "mnist1d", "local_steps": 10, "seed": args.seed, "target_accuracy": args.target}
    configs: list[tuple[str, dict]] = []
    if "sampling" in args.groups:
        for partition in ("iid", "dirichlet:0.5"):
            for config in SAMPLING:
                settings = {**common, "peers": 64, "rounds": args.rounds, "partition": partition, "stop_at_target": True}
                configs.append((partition, {**settings, **config}))
    if "faults" in args.groups:
        for task in args.fault_tasks:
            for config in FAULTS:
                settings = {**common, "task": task, "peers": 100, "rounds": 100, "partition": "iid"}
                configs.append((f"faults {task}", {**settings, "algorithm": "modest", "sample_size": 10, **config}))
    # The D-PSGD runs take the longest (every peer trains every round): started first, the
    # workers finish together.
    order = sorted(range(len(configs)), key=lambda index: configs[index][1]["algorithm"] != "dpsgd")
    with tempfile.TemporaryDirectory() as scratch:
        outs = [Path(scratch) / str(index) for index in range(len(configs))]
        ran = run_all([configs[index][1] for index in order], args.jobs, [outs[index] for index in order])
        results = [result for _, result in sorted(zip(order, ran))]
        plotted = [out for (name, _), out in zip(configs, outs) if name == "iid"]
        if args.plot and plotted:
            from peer.plot import plot_runs
            from peer.runs import load_run

            plot_runs([load_run(out) for out in plotted], args.plot, "bytes", log_x=True)
    report: dict = {"common": common}
    for group in dict.fromkeys(name for name, _ in configs):
        rows = [row(result["summary"]) for (name, _), result in zip(configs, results) if name == group]
        if group.startswith("faults"):
            healthy, crashed, crashed_a1 = (r["final_accuracy"] for r in rows)
            report[group] = {
                "rows": rows,
                "a2_accuracy_lost_to_the_crash": round(healthy - crashed, 4),
                "a1_accuracy_lost_to_the_crash": round(healthy - crashed_a1, 4),
            }
        else:
            report[group] = sampling_report(rows)
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
