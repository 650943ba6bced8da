"""What bytes cost on slow links: DiLoCo whole, streamed in fragments, overlapped with training, with
4-bit and sparse pseudo-gradients, against D-PSGD with top-k and CHOCO, at equal inner steps per peer.

The Shakespeare GPT, 8 peers holding whole speakers, --steps inner steps per peer (AdamW), every
peer's uplink and downlink at each speed of --links (Mbit/s), one inner step taking --step-time
simulated seconds. Scenarios, each adding to the one before it (H = --interval, F = --fragments):

- ``diloco``: the mean over all peers every H steps, float32 pseudo-gradients (ring all-reduce);
- ``fragments``: the model in F fragments, one combined every H / F steps (each every H);
- ``overlap``: the same, each combination travelling while the next H / F steps run;
- ``quant4``: the same, pseudo-gradients in 4 bits (--quant);
- ``chunktopk``: the same, 2% of each chunk in 2 bits with error feedback (--sparse), gathered;
- ``dpsgd-topk``: D-PSGD on a ring every H / F steps, top-k models with CHOCO (--dpsgd-codec).

Each row: final mean test loss, bytes sent per peer, the most bytes a peer sent in one round (in
one average, for DiLoCo), one
pseudo-gradient's wire size and how many times smaller than float32 it is, the simulated seconds
to --target-loss (null if never reached), the share of the run the peers spent waiting on the
network, and the loss, bytes and time relative to ``diloco`` on the same links. Prints JSON;
--plot FOLDER writes the loss against simulated time for each speed.

    python scripts/bench_bandwidth.py --data-dir ../shared/data [--links 10 100] [--plot runs/bandwidth]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gossip.codecs import parse_codec, wire_bytes
from gossip.model_codec import ModelMessages
from peer.config import SimulationConfig
from peer.plot import plot_runs
from peer.runs import load_run
from peer.simulate import simulate
from peer.tasks import load_task

TASK = {"task": "shakespeare", "peers": 8, "partition": "natural", "batch_size": 12, "eval_peers": 2, "eval_samples": 1000}
EVALUATIONS = 12  # evaluated rounds per run, about


def scenarios(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    whole = {"algorithm": "diloco", "local_steps": args.interval}
    fragments = {"algorithm": "diloco", "local_steps": args.interval // args.fragments, "fragments": args.fragments}
    overlap = {**fragments, "overlap": fragments["local_steps"]}
    found = {
        "diloco": whole,
        "fragments": fragments,
        "overlap": overlap,
        "quant4": {**overlap, "codec": args.quant},
        "chunktopk": {**overlap, "codec": args.sparse, "error_feedback": "residual"},
        "dpsgd-topk": {
            "algorithm": "dpsgd", "topology": "ring", "local_steps": fragments["local_steps"], "codec": args.dpsgd_codec,
            "error_feedback": "choco",
        },
    }
    return {name: s for name, s in found.items() if not args.scenarios or name in args.scenarios}


def settings_for(scenario: dict[str, Any], link: float, args: argparse.Namespace) -> dict[str, Any]:
    rounds = max(1, args.steps // scenario["local_steps"])
    return {
        **TASK, **scenario, "data_dir": args.data_dir, "seed": args.seed, "rounds": rounds,
        "eval_every": max(1, rounds // EVALUATIONS), "link_bandwidth": link, "step_time": args.step_time,
        "target_loss": args.target_loss,
    }


def run(settings: dict[str, Any], folder: Path) -> dict[str, Any]:
    started = time.perf_counter()
    summary = simulate(SimulationConfig(**settings, out=folder, overwrite=True)).summary
    peers = summary["peers"]
    rounds = _records(folder)
    return {
        "steps_per_peer": summary["rounds_completed"] * summary["local_steps"],
        "mean_loss": summary["mean_loss"],
        "bytes_per_peer": summary["bytes_sent_total"] // peers,
        "peak_bytes_per_round": summary["averaged_bytes_peak"] or _peak_round_bytes(rounds),
        "seconds_to_target": summary["virtual_seconds_to_target"],
        "simulated_seconds": summary["virtual_seconds"],
        "waiting_share": _waiting_share(rounds),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def _records(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Each peer's round records, in order."""
    by_peer: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("metrics*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            by_peer.setdefault(record["peer"], []).append(record)
    return by_peer


def _peak_round_bytes(records: dict[str, list[dict[str, Any]]]) -> int:
    """The most bytes any peer sent in one round (for runs that do not average: those that do
    report their largest average, since an overlapped one may land in the next round's record)."""
    peak = 0
    for rounds in records.values():
        sent = [0] + [record["bytes_sent"] for record in rounds]
        peak = max(peak, *(after - before for before, after in itertools.pairwise(sent)))
    return peak


def _waiting_share(records: dict[str, list[dict[str, Any]]]) -> float:
    """The peers' mean share of their run spent waiting for the network (their rounds' exchange time)."""
    shares = [sum(r["exchange_seconds"] for r in rounds) / rounds[-1]["virtual_time"] for rounds in records.values()]
    return round(sum(shares) / len(shares), 4)


def pseudo_gradient_bytes(spec: str, args: argparse.Namespace) -> int:
    """The wire size of one whole-model pseudo-gradient through the codec ``spec``."""
    model = load_task("shakespeare", args.data_dir, peers=TASK["peers"]).make_model()
    state = {name: torch.randn_like(t) for name, t in model.state_dict().items() if t.is_floating_point()}
    tensors, _, _ = ModelMessages(state, parse_codec(spec)).encode(state, seed=0)
    return wire_bytes(tensors)


def relative_to_diloco(rows: dict[str, dict[str, Any]]) -> None:
    base = rows.get("diloco")
    if base is None:
        return
    for row in rows.values():
        row["loss_vs_diloco"] = round(row["mean_loss"] / base["mean_loss"], 4)
        row["bytes_fewer_than_diloco"] = round(base["bytes_per_peer"] / max(row["bytes_per_peer"], 1), 1)
        row["peak_fewer_than_diloco"] = round(base["peak_bytes_per_round"] / max(row["peak_bytes_per_round"], 1), 2)
        if base["seconds_to_target"] and row["seconds_to_target"]:
            row["sooner_than_diloco"] = round(base["seconds_to_target"] / row["seconds_to_target"], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="folder holding tinyshakespeare/")
    parser.add_argument("--steps", type=int, default=480, help="inner steps per peer in every run (default 480)")
    parser.add_argument("--interval", type=int, default=48, help="DiLoCo's H (default 48)")
    parser.add_argument("--fragments", type=int, default=4, help="F (default 4)")
    parser.add_argument("--links", type=float, nargs="+", default=[10.0, 100.0], help="Mbit/s each way (default 10 100)")
    parser.add_argument("--step-time", type=float, default=0.1, help="simulated seconds per inner step (default 0.1)")
    parser.add_argument("--target-loss", type=float, default=2.4, help="the loss whose time is compared (default 2.4)")
    parser.add_argument("--quant", default="quant:4", help="the 4-bit codec (default quant:4)")
    parser.add_argument("--sparse", default="chunktopk:0.02:2", help="the sparse codec (default chunktopk:0.02:2)")
    parser.add_argument("--dpsgd-codec", default="topk:0.02", help="D-PSGD's codec (default topk:0.02)")
    parser.add_argument("--scenarios", nargs="+", default=None, help="run only these (names as in the output)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=None, help="write FOLDER/loss-time-LINK.png for each speed")
    parser.add_argument("--runs", type=Path, default=None, help="keep each run's folder under this one (default: discarded)")
    args = parser.parse_args()
    codecs = {spec: pseudo_gradient_bytes(spec, args) for spec in ("none", args.quant, args.sparse)}
    results: dict[str, Any] = {
        "settings": {**TASK, **{k: v for k, v in vars(args).items() if k not in ("data_dir", "plot", "runs")}},
        "pseudo_gradient_bytes": codecs,
        "pseudo_gradient_smaller": {spec: round(codecs["none"] / size, 1) for spec, size in codecs.items()},
        "links": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        for link in args.links:
            rows, folders = {}, []
            for name, scenario in scenarios(args).items():
                folder = (args.runs or Path(scratch)) / f"{link:g}-{name}"
                rows[name] = run(settings_for(scenario, link, args), folder)
                folders.append(folder)
                print(json.dumps({f"{link:g}": {name: rows[name]}}), file=sys.stderr, flush=True)
            relative_to_diloco(rows)
            results["links"][f"{link:g}"] = rows
            if args.plot:
                args.plot.mkdir(parents=True, exist_ok=True)
                plot_runs([load_run(f) for f in folders], args.plot / f"loss-time-{link:g}.png", x="time", y="loss")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
