"""Asynchronous gossip against synchronous D-PSGD when some peers are slower.

16 peers on a ring, MNIST-1D split Dirichlet(0.5), a quarter of them 4x slower
(``--speeds stragglers:0.25:4``), each run evaluated every iteration (``--eval-every``):

- ``dpsgd``: synchronous D-PSGD; every round waits for the slowest neighbour.
- ``dpsgd-deadline``: synchronous D-PSGD whose exchanges give up after a short deadline
  (``--deadline`` times a fast peer's round of local steps), so fast peers move on without
  the slow ones' models, which then arrive late and are dropped.
- ``async-constant``: asynchronous gossip, every cached model weighted as if fresh.
- ``async``: asynchronous gossip with the staleness weight (1 + tau)^-0.5.
- ``async-adaptive``: the same with adaptive local steps (H = K for the fastest peer).
- ``dpsgd-same`` and ``async-same``: both with every peer at the same speed, and
  ``dpsgd-same-start``: D-PSGD mixing the models the peers started the round from, its own
  update added after (``--mix-point start``), the order that asynchronous gossip must use.

Synchronous runs do ``--rounds`` rounds. An asynchronous run does as many iterations as let
its peers take the same number of local steps in all as the synchronous run (the slow peers
take fewer, so the fast ones take more iterations), so that both end on the same budget of
local work, each at the end of its own learning-rate schedule.

Per run: the simulated time until the peers' mean accuracy (each peer's latest) reached
``--target``, the final accuracy of the slow and of the fast peers, and the mean accuracy once
every peer together had taken the synchronous run's local steps. Ratios compare each run to
synchronous D-PSGD at the same speeds.

    python scripts/bench_async.py [--rounds 100] [--jobs 2] [--target 0.75] [--plot FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from sweep import check_settings

from peer.config import SimulationConfig
from peer.curve import LatestAccuracies
from peer.runs import load_run, read_records
from peer.sim.speeds import parse_speeds
from peer.simulate import simulate

STRAGGLERS = "stragglers:0.25:4"
VARIANTS = {
    "dpsgd": {"algorithm": "dpsgd"},
    "dpsgd-deadline": {"algorithm": "dpsgd"},  # its exchange timeout is set from --deadline
    "async-constant": {"algorithm": "async-gossip", "staleness": "constant"},
    "async": {"algorithm": "async-gossip", "staleness": "poly:0.5"},
    "async-adaptive": {"algorithm": "async-gossip", "staleness": "poly:0.5", "local_steps": "adaptive"},
    "dpsgd-same": {"algorithm": "dpsgd", "speeds": "same"},
    "dpsgd-same-start": {"algorithm": "dpsgd", "speeds": "same", "mix_point": "start"},
    "async-same": {"algorithm": "async-gossip", "staleness": "poly:0.5", "speeds": "same"},
}
BASELINE = {"dpsgd": "dpsgd", "dpsgd-deadline": "dpsgd", "async-constant": "dpsgd", "async": "dpsgd",
            "async-adaptive": "dpsgd", "dpsgd-same": "dpsgd-same", "dpsgd-same-start": "dpsgd-same",
            "async-same": "dpsgd-same"}


def settings_of(name: str, args: argparse.Namespace) -> dict:
    variant = dict(VARIANTS[name])
    settings = {
        "peers": args.peers, "topology": "ring", "task": "mnist1d", "partition": args.partition, "seed": args.seed,
        "eval_every": args.eval_every,
        "speeds": variant.pop("speeds", STRAGGLERS), "step_time": args.step_time, "target_accuracy": args.target,
        "local_steps": args.local_steps, "rounds": args.rounds, **variant,
    }
    if name == "dpsgd-deadline":
        settings["exchange_timeout"] = args.deadline * args.local_steps * args.step_time
    if settings["local_steps"] == "adaptive":
        settings["local_steps"] = f"adaptive:{args.local_steps}"
    if settings["algorithm"] == "async-gossip":
        settings["rounds"] = iterations_for_equal_work(settings, args)
    return settings


def iterations_for_equal_work(settings: dict, args: argparse.Namespace) -> int:
    """Iterations after which the peers have taken the synchronous run's local steps in all.

    The fastest peers do every iteration; a peer k times slower (without adaptive steps) finishes
    one of its own for every k of theirs and jumps to their iteration, so it takes 1/k of their
    steps; with adaptive steps it keeps pace on 1/k of the steps. Either way, per iteration the
    swarm takes K times the sum over peers of fastest/own speed."""
    speeds = parse_speeds(settings["speeds"], args.peers, args.step_time, args.seed)
    fastest = min(speeds.step_times)
    per_iteration = args.local_steps * sum(fastest / seconds for seconds in speeds.step_times)
    return math.ceil(args.peers * args.rounds * args.local_steps / per_iteration)


def accuracy_at_steps(folder: Path, peers: int, budget: int) -> float | None:
    """The mean of each peer's latest accuracy once all peers together had taken ``budget`` local steps."""
    curve = LatestAccuracies(peers)
    taken = 0
    for record in read_records(folder / "metrics.jsonl"):
        curve.add(record)
        taken += record.local_steps
        if taken >= budget:
            break
    latest = curve.latest()
    return round(latest.mean_accuracy, 4) if latest else None


def run(job: tuple[str, dict, int, str | None]) -> dict:
    name, settings, budget, keep = job
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(keep) / name if keep else Path(scratch)
        summary = simulate(SimulationConfig(**settings, out=folder)).summary
        result = {
            "run": name,
            "algorithm": summary["algorithm"],
            "speeds": summary["speeds"],
            "staleness": summary.get("staleness"),
            "local_steps": summary["local_steps"],
            "mix_point": summary.get("mix_point"),
            "exchange_timeout": settings.get("exchange_timeout", SimulationConfig.model_fields["exchange_timeout"].default),
            "rounds": summary["rounds"],
            "virtual_seconds_to_target": _round(summary["virtual_seconds_to_target"], 2),
            "final_accuracy": _round(summary["mean_accuracy"], 4),
            "final_accuracy_slow": _round(summary["mean_accuracy_slow"], 4),
            "final_accuracy_fast": _round(summary["mean_accuracy_fast"], 4),
            "accuracy_at_equal_steps": accuracy_at_steps(folder, settings["peers"], budget),
            "local_steps_total": summary["local_steps_total"],
            "virtual_seconds": round(summary["virtual_seconds"], 2),
            "wall_seconds": round(summary["wall_seconds"], 1),
            "curve": [(point.seconds, point.mean_accuracy) for point in load_run(folder).points],
        }
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}), file=sys.stderr, flush=True)
    return result


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def compare(results: dict[str, dict]) -> dict[str, dict]:
    ratios = {}
    for name, result in results.items():
        base = results.get(BASELINE[name])
        if base is None or name == BASELINE[name]:
            continue
        sync_time, own_time = base["virtual_seconds_to_target"], result["virtual_seconds_to_target"]
        slow, fast = result["final_accuracy_slow"], result["final_accuracy_fast"]
        equal, base_equal = result["accuracy_at_equal_steps"], base["accuracy_at_equal_steps"]
        ratios[name] = {
            "speedup_to_target": round(sync_time / own_time, 2) if sync_time and own_time else None,
            "slow_minus_fast_points": round(100 * (slow - fast), 2) if slow is not None and fast is not None else None,
            "minus_sync_at_equal_steps_points": round(100 * (equal - base_equal), 2) if equal and base_equal else None,
        }
    same_order = results.get("dpsgd-same-start")
    if same_order and "async-same" in ratios:
        ratios["async-same"]["minus_sync_in_the_same_order_points"] = round(
            100 * (results["async-same"]["accuracy_at_equal_steps"] - same_order["accuracy_at_equal_steps"]), 2
        )
    return ratios


def plot(results: dict[str, dict], path: Path, target: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    for name, result in results.items():
        if "-same" in name:  # every peer at one speed: not this figure's scenario
            continue
        seconds, accuracy = zip(*result["curve"]) if result["curve"] else ((), ())
        axes.plot(seconds, accuracy, label=name, linewidth=1.4)
    axes.axhline(target, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("simulated seconds")
    axes.set_ylabel("mean test accuracy (each peer's latest)")
    axes.set_title(title)
    axes.legend(loc="lower right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--peers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=100, help="rounds of the synchronous runs")
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--eval-every", type=int, default=1, help="iterations (rounds) between evaluations")
    parser.add_argument("--step-time", type=float, default=0.01, help="a fast peer's simulated seconds per local step")
    parser.add_argument("--deadline", type=float, default=0.5, help="dpsgd-deadline's exchange timeout, in fast rounds of local steps")
    parser.add_argument("--target", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--keep", type=Path, default=None, help="keep each run's folder under this one")
    parser.add_argument("--plot", type=Path, default=None, help="draw accuracy against simulated time to this image")
    args = parser.parse_args()
    settings = {name: settings_of(name, args) for name in args.runs}
    check_settings(parser, list(settings.values()))
    budget = args.peers * args.rounds * args.local_steps
    jobs = [(name, each, budget, str(args.keep) if args.keep else None) for name, each in settings.items()]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = {result["run"]: result for result in pool.map(run, jobs)}
    if args.plot:
        plot(results, args.plot, args.target, f"{args.peers} peers on a ring, {STRAGGLERS} (MNIST-1D, {args.partition})")
    print(json.dumps({
        "target_accuracy": args.target,
        "local_steps_budget": budget,
        "runs": [{k: v for k, v in result.items() if k != "curve"} for result in results.values()],
        "compared_to_sync": compare(results),
    }, indent=2))


if __name__ == "__main__":
    main()
