"""Accuracy against bytes: one simulated scenario run with each codec and kind of error feedback.

Every configuration runs the same scenario (the defaults are 16 peers, ring, mnist1d,
Dirichlet 0.5, 100 rounds of 10 local steps, seed 0), evaluated every round. Prints a JSON
table, one row per configuration: final mean accuracy, bytes sent by all peers, bytes sent
until the mean accuracy first reached the target (null if it never did), and both byte counts
as a ratio of the uncompressed run's (how many times fewer bytes).

    python scripts/bench_compression.py [--jobs 2] [--rounds 100] [--target 0.75]
    python scripts/bench_compression.py --configs none/none topk:0.01/choco topk:0.01/econtrol:0.05
"""

from __future__ import annotations

import argparse
import json
import sys

from sweep import run_all

# CODEC/ERROR_FEEDBACK[/CONSENSUS_STEP]; the first one is the uncompressed reference.
CONFIGS = [
    "none/none",
    "fp16/none",
    "fp16/choco",
    "int8/none",
    "int8/choco",
    "topk:0.01/none",
    "topk:0.01/choco",
    "topk:0.01/econtrol:0.05",
    "topk:0.01+int8/choco",
    "randk:0.08+int8/choco",
    "topk:0.1/choco",
    "topk:0.25/none",
    "topk:0.25/choco",
]


def settings(config: str, scenario: dict) -> dict:
    codec, error_feedback, *step = config.split("/")
    # A consensus step is given only where the configuration names one: it is CHOCO's, refused without error feedback.
    return {**scenario, "codec": codec, "error_feedback": error_feedback, **({"consensus_step": float(step[0])} if step else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=CONFIGS, help="CODEC/ERROR_FEEDBACK[/CONSENSUS_STEP]; the first is the reference")
    parser.add_argument("--jobs", type=int, default=2, help="simulations run side by side")
    parser.add_argument("--target", type=float, default=0.75, help="mean accuracy for the bytes-to-target column")
    parser.add_argument("--peers", type=int, default=16)
    parser.add_argument("--topology", default="ring")
    parser.add_argument("--task", default="mnist1d")
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    scenario = {
        "peers": args.peers, "topology": args.topology, "task": args.task, "partition": args.partition,
        "rounds": args.rounds, "local_steps": args.local_steps, "seed": args.seed, "algorithm": "dpsgd",
        "target_accuracy": args.target,
    }
    results = run_all([settings(config, scenario) for config in args.configs], args.jobs)
    reference = results[0]
    reference_to_target = reference["summary"]["bytes_to_target"]
    rows = []
    for result in results:
        summary = result["summary"]
        to_target = summary["bytes_to_target"]
        rows.append({
            "codec": summary["codec"],
            "error_feedback": summary["error_feedback"],
            "consensus_step": summary["consensus_step"] if summary["error_feedback"] != "none" else None,
            "final_mean_accuracy": round(summary["mean_accuracy"], 4),
            "accuracy_vs_reference_points": round(100 * (summary["mean_accuracy"] - reference["summary"]["mean_accuracy"]), 2),
            "consensus_distance": round(summary["consensus_distance"], 3),
            "bytes_sent": summary["bytes_sent_total"],
            "fewer_bytes_x": round(reference["summary"]["bytes_sent_total"] / summary["bytes_sent_total"], 2),
            "bytes_to_target": to_target,
            "fewer_bytes_to_target_x": round(reference_to_target / to_target, 2) if to_target and reference_to_target else None,
        })
    json.dump({"scenario": scenario, "target_accuracy": args.target, "reference": args.configs[0], "rows": rows}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
