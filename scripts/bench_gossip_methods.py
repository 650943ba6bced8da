"""Variance-corrected mixing and DFedSAM / DFedSAM-MGS against plain gossip, side by side.

Two groups of simulations (16 peers, mnist1d, 100 rounds of 10 local steps, seed 0 unless
changed), each configuration evaluated every round:

- ``variance``: IID data, every peer from its own random model (``--init independent``):
  plain mixing and the three variance-corrected targets, on a ring and on ``regular:6``,
  against FedAvg from a common model.
- ``dfedsam``: Dirichlet(0.3) on a ring: D-PSGD, DFedSAM (Q = 1) with rho in {0.01, 0.05,
  0.1}, and DFedSAM-MGS (Q = 4).

Prints a JSON table per group: final mean accuracy, rounds until the mean accuracy first
reached the target (null if never), bytes sent by all peers, and the mean accuracy when the
configuration had sent as many bytes as the group's first row sent in the whole run
(accuracy at equal bytes: Q gossip steps cost Q times the bytes per round).

    python scripts/bench_gossip_methods.py [--groups variance dfedsam] [--jobs 2] [--target 0.8]
"""

from __future__ import annotations

import argparse
import json
import sys

from sweep import accuracy_at_bytes, run_all

GROUPS = {
    "variance": [
        {"topology": "ring", "partition": "iid", "init": "independent", "mixing": "plain"},
        {"topology": "ring", "partition": "iid", "init": "independent", "mixing": "variance-corrected"},
        {"topology": "ring", "partition": "iid", "init": "independent", "mixing": "variance-corrected:self"},
        {"topology": "ring", "partition": "iid", "init": "independent", "mixing": "variance-corrected:conservative:0.5"},
        {"topology": "regular:6", "partition": "iid", "init": "independent", "mixing": "plain"},
        {"topology": "regular:6", "partition": "iid", "init": "independent", "mixing": "variance-corrected"},
        {"topology": "ring", "partition": "iid", "init": "same", "mixing": "plain"},
        {"algorithm": "fedavg", "partition": "iid", "init": "same"},
    ],
    "dfedsam": [
        {"topology": "ring", "partition": "dirichlet:0.3", "algorithm": "dpsgd"},
        {"topology": "ring", "partition": "dirichlet:0.3", "algorithm": "dfedsam", "sam_rho": 0.01},
        {"topology": "ring", "partition": "dirichlet:0.3", "algorithm": "dfedsam", "sam_rho": 0.05},
        {"topology": "ring", "partition": "dirichlet:0.3", "algorithm": "dfedsam", "sam_rho": 0.1},
        {"topology": "ring", "partition": "dirichlet:0.3", "algorithm": "dfedsam", "sam_rho": 0.05, "gossip_steps": 4},
        {"topology": "ring", "partition": "dirichlet:0.3", "algorithm": "dpsgd", "gossip_steps": 4},
        {"partition": "dirichlet:0.3", "algorithm": "fedavg"},
    ],
}
SHOWN = ("algorithm", "topology", "partition", "init", "mixing", "gossip_steps", "sam_rho")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", nargs="+", choices=sorted(GROUPS), default=sorted(GROUPS, reverse=True))
    parser.add_argument("--jobs", type=int, default=2, help="simulations run side by side")
    parser.add_argument("--target", type=float, default=0.8, help="mean accuracy for the rounds-to-target column")
    parser.add_argument("--peers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    common = {
        "peers": args.peers, "rounds": args.rounds, "local_steps": args.local_steps, "seed": args.seed, "task": "mnist1d",
        "target_accuracy": args.target,
    }
    configs = [(group, {**common, **config}) for group in args.groups for config in GROUPS[group]]
    results = run_all([settings for _, settings in configs], args.jobs)
    report: dict = {"common": common}
    for group in args.groups:
        rows = [result for (name, _), result in zip(configs, results) if name == group]
        budget = rows[0]["summary"]["bytes_sent_total"]
        report[group] = {
            "equal_bytes_budget": budget,
            "rows": [
                {
                    **{key: row["summary"][key] for key in SHOWN if row["summary"].get(key) is not None},
                    "final_mean_accuracy": round(row["summary"]["mean_accuracy"], 4),
                    "rounds_to_target": row["summary"]["rounds_to_target"],
                    "bytes_sent": row["summary"]["bytes_sent_total"],
                    "accuracy_at_equal_bytes": accuracy_at_bytes(row["curve"], budget),
                }
                for row in rows
            ],
        }
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
