"""How much self-repellence buys: the error of a walking token's model against the exact optimum.

One token (``--algorithm srrw``) walks the graph for ``--hops`` hops through the simulated world,
each holder taking one full-gradient step on its part of the convex ``logistic`` task (its own
data, shifted per peer; ``--partition natural``), with a = 0.8 and b = 0.9. For each graph and
each alpha the script reports the mean over ``--seeds`` seeds of ||theta - theta*||^2 after the
last hop, with its standard error; ``iid`` is the reference of peers drawn uniformly at random
(a walk on the complete graph that stays put with probability 1/n, which is exactly that).
Graphs: a 33-peer ring and a 64-peer random 4-regular graph (a new graph for each seed).

``--crash-every H`` adds, on the 4-regular graph at alpha 5, runs in which the token's holder
crashes every H hops (``--faults crash-holder``: it comes back 60 simulated seconds later
without its memory of the walk) next to the same runs without crashes, and the live copies of
the token at the end.

With ``--plot FILE`` the mean error against the hop is drawn, one curve per alpha, one panel
per graph.

    python scripts/bench_srrw.py [--seeds 20] [--hops 20000] [--jobs 2] [--crash-every 1000 [--crash-seeds N]] [--plot FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from sweep import check_settings

from peer.config import SimulationConfig
from peer.simulate import simulate

GRAPHS = {"ring:33": ("ring", 33), "regular:4:64": ("regular:4", 64)}
ALPHAS = [0.0, 1.0, 5.0, 10.0, 20.0]
CRASH_ALPHA = 5.0
CRASH_GRAPH = "regular:4:64"
DOWN_SECONDS = 60
CURVE_POINTS = 50


def settings(graph: str, alpha: float | None, seed: int, hops: int, faults: str = "none") -> dict:
    """A run's settings; alpha None is the i.i.d. reference."""
    topology, peers = GRAPHS[graph]
    walk = {"topology": topology, "alpha": alpha} if alpha is not None else {
        "topology": "complete", "alpha": 0.0, "srrw_stay": 1 / peers,
    }
    return {
        "algorithm": "srrw", "task": "logistic", "partition": "natural", "peers": peers, "rounds": hops,
        "local_steps": 1, "batch_size": 1 << 20, "srrw_a": 0.8, "srrw_b": 0.9, "seed": seed,
        "eval_every": max(1, hops // CURVE_POINTS), "faults": faults, **walk,
    }


def run(config: dict) -> dict:
    """One run: the error at each evaluated hop, and what became of the token."""
    torch.set_num_threads(1)
    errors: dict[int, float] = {}

    def record(entry) -> None:
        if entry.squared_error is not None:
            errors[entry.round + 1] = entry.squared_error

    summary = simulate(SimulationConfig(**config), on_record=record).summary
    return {
        "curve": sorted(errors.items()), "squared_error": summary["squared_error"],
        "token_copies": summary["token_copies"], "tokens_reissued": summary["tokens_reissued"],
    }


def mean_and_error(values: list[float]) -> dict:
    spread = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return {"mse": float(f"{statistics.fmean(values):.4g}"), "se": float(f"{spread:.2g}")}


def crash_spec(hops: int, every: int) -> str:
    return ",".join(f"crash-holder:{DOWN_SECONDS}@{hop}" for hop in range(every, hops, every))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--hops", type=int, default=20_000)
    parser.add_argument("--jobs", type=int, default=2, help="simulations run side by side")
    parser.add_argument("--graphs", nargs="+", default=list(GRAPHS), choices=list(GRAPHS))
    parser.add_argument("--alphas", nargs="+", type=float, default=ALPHAS)
    parser.add_argument("--crash-every", type=int, help="also runs whose holder crashes every H hops")
    parser.add_argument("--crash-seeds", type=int, help="seeds of the runs with crashes (default: --seeds)")
    parser.add_argument("--plot", type=Path, help="draw the mean error against the hop into FILE")
    args = parser.parse_args()
    cases = [(graph, alpha, "none") for graph in args.graphs for alpha in [*args.alphas, None]]
    if args.crash_every:
        cases.append((CRASH_GRAPH, CRASH_ALPHA, crash_spec(args.hops, args.crash_every)))
        if (CRASH_GRAPH, CRASH_ALPHA, "none") not in cases:
            cases.append((CRASH_GRAPH, CRASH_ALPHA, "none"))
    crash_seeds = min(args.crash_seeds or args.seeds, args.seeds)
    seeds = {case: crash_seeds if case[2] != "none" else args.seeds for case in cases}
    configs = [
        settings(graph, alpha, seed, args.hops, faults) for graph, alpha, faults in cases for seed in range(seeds[graph, alpha, faults])
    ]
    check_settings(parser, configs)
    started = time.perf_counter()
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for config, result in zip(configs, pool.map(run, configs, chunksize=1)):
            results.append(result)
            # One line per finished run on stderr, so that a long benchmark shows its progress.
            progress = {key: config[key] for key in ("topology", "alpha", "srrw_stay", "seed", "faults") if key in config}
            print(json.dumps({**progress, "squared_error": result["squared_error"]}), file=sys.stderr, flush=True)
    by_case, start = {}, 0
    for case in cases:
        by_case[case], start = results[start : start + seeds[case]], start + seeds[case]

    report: dict = {"hops": args.hops, "seeds": args.seeds, "a": 0.8, "b": 0.9, "graphs": {}, "ratios": {}}
    for graph in args.graphs:
        rows = {}
        for alpha in [*args.alphas, None]:
            rows["iid" if alpha is None else f"{alpha:g}"] = mean_and_error(
                [r["squared_error"] for r in by_case[(graph, alpha, "none")]]
            )
        report["graphs"][graph] = rows
        if "0" in rows and "5" in rows:
            report["ratios"][graph] = {
                "alpha5_over_alpha0": round(rows["5"]["mse"] / rows["0"]["mse"], 3),
                "alpha5_over_iid": round(rows["5"]["mse"] / rows["iid"]["mse"], 3),
            }
    if args.crash_every:
        clean = [r["squared_error"] for r in by_case[(CRASH_GRAPH, CRASH_ALPHA, "none")][:crash_seeds]]
        crashed_runs = by_case[(CRASH_GRAPH, CRASH_ALPHA, crash_spec(args.hops, args.crash_every))]
        crashed = [r["squared_error"] for r in crashed_runs]
        report["holder_crashes"] = {
            "graph": CRASH_GRAPH, "alpha": CRASH_ALPHA, "every_hops": args.crash_every, "down_seconds": DOWN_SECONDS,
            "seeds": crash_seeds,
            "fault_free": mean_and_error(clean), "crashing": mean_and_error(crashed),
            "ratio": round(statistics.fmean(crashed) / statistics.fmean(clean), 3),
            "reissued_per_run": statistics.fmean(r["tokens_reissued"] for r in crashed_runs),
            "runs_with_one_live_copy": sum(r["token_copies"] == [1] for r in crashed_runs),
        }
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    if args.plot:
        plot(args.plot, args, by_case)
    json.dump(report, sys.stdout, indent=2)
    print()


def plot(path: Path, args: argparse.Namespace, by_case: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(args.graphs), figsize=(6 * len(args.graphs), 4.2), squeeze=False)
    for axis, graph in zip(axes[0], args.graphs):
        for alpha in [*args.alphas, None]:
            runs = by_case[(graph, alpha, "none")]
            hops = [hop for hop, _ in runs[0]["curve"]]
            means = [statistics.fmean(run["curve"][i][1] for run in runs) for i in range(len(hops))]
            label, style = ("i.i.d. peers", "k--") if alpha is None else (f"alpha {alpha:g}", "-")
            axis.plot(hops, means, style, label=label)
        axis.set(xscale="log", yscale="log", xlabel="hop", ylabel="mean ||theta - theta*||^2", title=graph)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(f"SRRW on the logistic task: {args.seeds} seeds, a = 0.8, b = 0.9")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
