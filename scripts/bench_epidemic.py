"""Epidemic learning against fixed graphs: rounds and bytes to a target, and accuracy under attack.

Two parts, each a JSON table (``--parts convergence byzantine``):

- ``convergence``: 96 peers of D-PSGD (``--peers``), MNIST-1D (``--task mnist1d:48000``, 500
  sequences per peer; ``--task cifar10`` where the machine allows it) split by Dirichlet(0.5)
  (``--partition``), ``--rounds`` rounds of 10 local steps on ``el-local:S``, ``el-oracle:S``, a
  static ``regular:S`` (S = ``--fanout``, 7 by default; a ring for S = 2), ``onepeer-exponential``
  and ``base:1``, and MoDeST with half the peers training and S aggregators (as many models a round
  as the S-recipient overlays: 2 x 48 x 7 against 96 x 7). Per overlay: the final mean accuracy,
  the rounds and bytes (all peers) until the mean accuracy first reached ``--target`` and the rounds
  to each of ``--more-targets``, the bytes per round, and the rounds as a ratio to the static
  graph's (above 1: fewer rounds than the fixed graph). ``--eval-peers`` peers evaluate every round
  (16 by default: 96 evaluations a round would dominate).
- ``byzantine``: the table of ``bench_byzantine.py`` (16 peers, ``--fraction`` 0.2 of them attackers,
  100 rounds of 10 steps, MNIST-1D split by ``--partition``, ``--mixing clipped``) on ``regular:4``,
  ``regular:7``, ``el-oracle:7`` and ``el-local:7``, and with ``:targeted`` attackers (the same victims
  every round) on the drawn overlays: each attack's mean honest accuracy, worst peer, ratio to the
  overlay's accuracy without attack, the fixed graphs' outnumbered peers (at least half of their
  neighbours attack), and for targeted attackers the victims' and the other honest peers' means.

With ``--plot FILE`` the convergence runs are drawn against the round (FILE).

    python scripts/bench_epidemic.py [--parts convergence byzantine] [--rounds 100] [--target 0.8] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench_byzantine import outnumbered
from sweep import check_settings, run_all

from topology import is_drawn


def overlays(fanout: int, peers: int) -> list[dict]:
    """The compared overlays: S recipients a round, drawn or fixed (a ring for S = 2: a random
    2-regular graph is a union of cycles, rarely connected), the two one-peer graphs, and MoDeST
    with half the peers training and S aggregators (2 x n/2 x S models a round, as n x S)."""
    return [
        {"topology": f"el-local:{fanout}"},
        {"topology": f"el-oracle:{fanout}"},
        {"topology": static(fanout)},
        {"topology": "onepeer-exponential"},
        {"topology": "base:1"},
        {"algorithm": "modest", "sample_size": peers // 2, "aggregators": fanout},
    ]


def static(fanout: int) -> str:
    return "ring" if fanout == 2 else f"regular:{fanout}"

ATTACKS = ["signflip", "alie:1", "ipm:0.1", "dissensus:1.5", "huge"]
BYZANTINE_OVERLAYS = ["regular:4", "regular:7", "el-oracle:7", "el-local:7"]
NO_ATTACK = "none"


def label(settings: dict) -> str:
    if settings.get("algorithm") == "modest":
        return f"modest s={settings['sample_size']} a={settings['aggregators']}"
    return settings["topology"]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 3) if numerator and denominator else None


def rounds_to(curve: list, target: float) -> int | None:
    """Rounds until the mean accuracy first reached ``target`` (None: never)."""
    return next((point.round + 1 for point in curve if point.mean_accuracy >= target), None)


def convergence(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    common = {
        "algorithm": "dpsgd", "peers": args.peers, "task": args.task, "partition": args.partition,
        "rounds": args.rounds, "local_steps": args.local_steps, "seed": args.seed, "target_accuracy": args.target,
        "eval_peers": args.eval_peers, "data_dir": args.data_dir,
    }
    if args.lr_schedule:
        common["lr_schedule"] = args.lr_schedule
    # MoDeST ends each round in one model, evaluated once: it has no peers to sample.
    configs = [
        {**common, **overlay, **({"eval_peers": None} if overlay.get("algorithm") == "modest" else {})}
        for overlay in overlays(args.fanout, args.peers)
    ]
    check_settings(parser, configs)
    with tempfile.TemporaryDirectory() as scratch:
        outs = [Path(scratch) / str(index) for index in range(len(configs))]
        results = run_all(configs, args.jobs, outs)
        if args.plot:
            from peer.plot import plot_runs
            from peer.runs import load_run

            plot_runs([load_run(out) for out in outs], args.plot)
    rows = {}
    for settings, result in zip(configs, results):
        summary = result["summary"]
        rows[label(settings)] = {
            "final_mean_accuracy": round(summary["mean_accuracy"], 4),
            "rounds_to_target": summary["rounds_to_target"],
            "bytes_to_target": summary["bytes_to_target"],
            "bytes_per_round": round(summary["bytes_sent_total"] / summary["rounds_completed"]),
            "rounds_to": {f"{t:g}": rounds_to(result["curve"], t) for t in args.more_targets},
            "in_degree": summary.get("in_degree"),
            "spectral_gap": summary.get("spectral_gap"),
        }
    reference = rows[static(args.fanout)]
    for row in rows.values():
        row["fewer_rounds_than_static"] = ratio(reference["rounds_to_target"], row["rounds_to_target"])
        row["fewer_rounds_than_static_at"] = {
            t: ratio(reference["rounds_to"][t], rounds) for t, rounds in row["rounds_to"].items()
        }
    return {"common": {k: v for k, v in common.items() if v is not None}, "rows": rows}


def byzantine(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    common = {
        "algorithm": "dpsgd", "peers": 16, "task": "mnist1d", "partition": args.partition, "rounds": args.rounds,
        "local_steps": 10, "seed": args.seed, "mixing": args.mixing,
    }
    cases = [
        (overlay, attack)
        for overlay in BYZANTINE_OVERLAYS
        for attack in [NO_ATTACK, *args.attacks, *([f"{a}:targeted" for a in args.attacks] if is_drawn(overlay) else [])]
    ]
    configs = [
        {**common, "topology": overlay, "byzantine": NO_ATTACK if attack == NO_ATTACK else f"{args.fraction:g}:{attack}"}
        for overlay, attack in cases
    ]
    check_settings(parser, configs)
    results = run_all(configs, args.jobs)
    summaries = {case: result["summary"] for case, result in zip(cases, results)}
    table: dict = {}
    for overlay in BYZANTINE_OVERLAYS:
        clean = summaries[(overlay, NO_ATTACK)]["mean_accuracy"]
        attackers = set(summaries[(overlay, f"{args.attacks[0]}")]["attackers"])
        rows: dict = {NO_ATTACK: {"accuracy": round(clean, 4)}}
        if not is_drawn(overlay):
            rows[NO_ATTACK]["outnumbered"] = outnumbered(overlay, common["peers"], args.seed, attackers)
        for (o, attack), summary in summaries.items():
            if o != overlay or attack == NO_ATTACK:
                continue
            rows[attack] = {
                "accuracy": round(summary["mean_accuracy"], 4),
                "worst_peer": round(summary["min_accuracy"], 4),
                "ratio_to_no_attack": ratio(summary["mean_accuracy"], clean),
            }
            if summary.get("victims"):
                rows[attack]["victims"] = round(summary["mean_accuracy_victims"], 4)
                rows[attack]["spared"] = round(summary["mean_accuracy_spared"], 4)
        table[overlay] = rows
    return {"common": common, "byzantine_fraction": args.fraction, "overlays": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["convergence", "byzantine"], default=["convergence", "byzantine"])
    parser.add_argument("--task", default="mnist1d:48000", help="the convergence part's task (cifar10 needs --data-dir)")
    parser.add_argument("--peers", type=int, default=96, help="the convergence part's peers")
    parser.add_argument("--fanout", type=int, default=7, help="S: recipients per peer and round")
    parser.add_argument("--partition", default="dirichlet:0.5", help="the convergence part's split")
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--lr-schedule", help="the convergence part's --lr-schedule (the simulator's default if not given)")
    parser.add_argument("--more-targets", type=float, nargs="*", default=[0.85, 0.9], help="rounds to these too")
    parser.add_argument("--data-dir", help="where cifar10's files are")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--target", type=float, default=0.8, help="the convergence part's target mean accuracy")
    parser.add_argument("--eval-peers", type=int, default=16, help="peers that evaluate every round (convergence)")
    parser.add_argument("--fraction", type=float, default=0.2, help="the fraction of the peers that attack")
    parser.add_argument("--attacks", nargs="+", default=ATTACKS, help="attacks, as --byzantine names them after F:")
    parser.add_argument("--mixing", default="clipped", help="the byzantine part's mixing rule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="simulations run side by side")
    parser.add_argument("--plot", type=Path, help="draw the convergence runs against the round in FILE")
    args = parser.parse_args()
    report: dict = {}
    started = time.perf_counter()
    if "convergence" in args.parts:
        report["convergence"] = convergence(args, parser)
    if "byzantine" in args.parts:
        report["byzantine"] = byzantine(args, parser)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
