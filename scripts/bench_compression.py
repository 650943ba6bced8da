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
import tempfile
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from peer.config import SimulationConfig
from peer.simulate import simulate

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


def run_config(config: str, scenario: dict) -> dict:
    codec, error_feedback, *step = config.split("/")
    with tempfile.TemporaryDirectory() as out:
        settings = SimulationConfig(
            **scenario, codec=codec, error_feedback=error_feedback,
            consensus_step=float(step[0]) if step else None, out=Path(out), eval_every=1,
        )
        summary = simulate(settings).summary
        rounds: dict[int, list[dict]] = defaultdict(list)
        for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            rounds[record["round"]].append(record)
    curve = [
        (sum(r["accuracy"] for r in records) / len(records), sum(r["bytes_sent"] for r in records))
        for _, records in sorted(rounds.items())
    ]
    return {
        "codec": summary["codec"],
        "error_feedback": summary["error_feedback"],
        "consensus_step": summary["consensus_step"] if summary["error_feedback"] != "none" else None,
        "final_mean_accuracy": round(summary["mean_accuracy"], 4),
        "consensus_distance": round(summary["consensus_distance"], 3),
        "bytes_sent": summary["bytes_sent_total"],
        "curve": curve,
    }


def bytes_to(curve: list[tuple[float, int]], target: float) -> int | None:
    return next((sent for accuracy, sent in curve if accuracy >= target), None)


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
    }
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_config, args.configs, [scenario] * len(args.configs)))
    reference = results[0]
    reference_to_target = bytes_to(reference["curve"], args.target)
    rows = []
    for result in results:
        to_target = bytes_to(result.pop("curve"), args.target)
        rows.append({
            **result,
            "bytes_to_target": to_target,
            "fewer_bytes_x": round(reference["bytes_sent"] / result["bytes_sent"], 2),
            "fewer_bytes_to_target_x": round(reference_to_target / to_target, 2) if to_target and reference_to_target else None,
            "accuracy_vs_reference_points": round(100 * (result["final_mean_accuracy"] - reference["final_mean_accuracy"]), 2),
        })
    json.dump({"scenario": scenario, "target_accuracy": args.target, "reference": args.configs[0], "rows": rows}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
