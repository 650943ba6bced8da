"""Honest accuracy under attack: each attack against each mixing rule, on a random 4-regular graph.

16 peers of D-PSGD on ``regular:4`` (a random 4-regular graph drawn from the seed), MNIST-1D
split by Dirichlet(0.5), 100 rounds of 10 local steps. In each attacked run 20% of the peers
attack (``--byzantine 0.2:ATTACK``: round(0.2 * 16) = 3 attackers, drawn from the seed; the
same 3 in every run), and the 13 honest peers are reported. For each mixing rule there is one
run without attackers and one per attack; an attack's row gives the honest peers' final mean
(and worst) test accuracy, and the mean's ratio to the rule's accuracy without attackers.
``outnumbered`` lists the honest peers with at least half of their neighbours attackers: no
rule that takes the majority's side can protect those (on a random 4-regular graph with 3
attackers among 16 peers, every seed has some). ``--topology regular:6 --seed 2`` is a graph
where every honest peer has at most a third of its neighbours attacking.

With ``--plot FILE`` each rule's runs are drawn against the round, one figure per rule
(FILE-RULE.png).

    python scripts/bench_byzantine.py [--rules plain clipped trimmed-mean:1 median] [--jobs 2] [--plot FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from sweep import check_settings, run_all

from peer.simulate import peer_ids
from topology import parse_topology

RULES = ["plain", "clipped", "trimmed-mean:1", "median"]
ATTACKS = ["signflip", "alie:1", "ipm:0.1", "dissensus:1.5", "noise:1", "huge"]
NO_ATTACK = "none"


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator else None


def outnumbered(topology: str, peers: int, seed: int, attackers: set[str]) -> list[str]:
    """The honest peers with at least half of their neighbours attackers."""
    graph = parse_topology(topology, peers, seed=seed)
    ids = peer_ids(peers)
    found = []
    for index, peer in enumerate(ids):
        neighbours = graph.out_neighbours(index, 0)
        if peer not in attackers and 2 * sum(ids[j] in attackers for j in neighbours) >= len(neighbours):
            found.append(peer)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", nargs="+", default=RULES, help="mixing rules, as --mixing names them")
    parser.add_argument("--attacks", nargs="+", default=ATTACKS, help="attacks, as --byzantine names them after F:")
    parser.add_argument("--fraction", type=float, default=0.2, help="the fraction of the peers that attack")
    parser.add_argument("--jobs", type=int, default=2, help="simulations run side by side")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--topology", default="regular:4", help="the graph, as --topology names it")
    parser.add_argument("--plot", type=Path, help="draw each rule's runs against the round, in FILE-RULE.png")
    args = parser.parse_args()
    common = {
        "algorithm": "dpsgd", "peers": 16, "topology": args.topology, "task": "mnist1d", "partition": "dirichlet:0.5",
        "rounds": args.rounds, "local_steps": 10, "seed": args.seed,
    }
    cases = [(rule, attack) for rule in args.rules for attack in [NO_ATTACK, *args.attacks]]
    configs = [
        {**common, "mixing": rule, "byzantine": NO_ATTACK if attack == NO_ATTACK else f"{args.fraction:g}:{attack}"}
        for rule, attack in cases
    ]
    check_settings(parser, configs)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        outs = [Path(scratch) / str(index) for index in range(len(configs))]
        results = run_all(configs, args.jobs, outs)
        wall_seconds = time.perf_counter() - started
        if args.plot:
            from peer.plot import plot_runs
            from peer.runs import load_run

            for rule in args.rules:
                runs = [load_run(out) for (r, _), out in zip(cases, outs) if r == rule]
                plot_runs(runs, args.plot.with_name(f"{args.plot.stem}-{rule.replace(':', '')}.png"))
    summaries = {case: result["summary"] for case, result in zip(cases, results)}
    attackers = next((s["attackers"] for s in summaries.values() if s["attackers"]), [])
    report: dict = {
        "common": common,
        "byzantine_fraction": args.fraction,
        "attackers": attackers,
        "outnumbered": outnumbered(args.topology, common["peers"], args.seed, set(attackers)),
        "rules": {},
    }
    for rule in args.rules:
        clean = summaries[(rule, NO_ATTACK)]["mean_accuracy"]
        rows = {NO_ATTACK: {"accuracy": round(clean, 4)}}
        for attack in args.attacks:
            summary = summaries[(rule, attack)]
            rows[attack] = {
                "accuracy": round(summary["mean_accuracy"], 4),
                "worst_peer": round(summary["min_accuracy"], 4),
                "ratio_to_no_attack": ratio(summary["mean_accuracy"], clean),
            }
        report["rules"][rule] = rows
    report["wall_seconds"] = round(wall_seconds, 1)
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
