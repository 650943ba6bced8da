"""Many short swarms of honest peers on a loaded host: does any peer refuse an honest neighbour?

Runs --runs local swarms (`peer swarm`) of each configuration in turn (by default async-gossip
with int8, D-PSGD with int8, and MoDeST), of --peers peers each (e.g. 3,4: alternating), while
--burners processes per core keep the host's CPUs busy. After each run it reads every peer's
summary.json and log.txt and counts: the messages refused by reason (every peer is honest, so
each refusal is one too many), the log lines that refuse a stream as over capacity or a message
as truncated, the peers ignored for their strikes, the peers that did not finish, and the peers
that never read every other's record or that nothing reached (they trained alone). Prints JSON: the totals per configuration and each run's.

    python scripts/honest_soak.py --runs 10 --burners 2 --local-steps 2 --configs async-int8:100,dpsgd-int8:30,modest:10
    python scripts/honest_soak.py --runs 3 --configs async-int8 --peers 4 --rounds 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

CONFIGS = {
    "async-int8": ["--algorithm", "async-gossip", "--codec", "int8"],
    "dpsgd-int8": ["--algorithm", "dpsgd", "--codec", "int8"],
    "modest": ["--algorithm", "modest"],
}
# What a peer's log says when it refuses or ignores an honest neighbour's stream.
PATTERNS = {
    "over_capacity_lines": "(over-capacity)",
    "truncated_lines": "truncated",
    "ignoring_lines": "ignoring ",
    "broken_stream_lines": "broke",
}
BURNER = "while True: pass"


def start_burners(count: int) -> list[subprocess.Popen]:
    return [
        subprocess.Popen([sys.executable, "-c", BURNER], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        for _ in range(count)
    ]


def stop_burners(burners: list[subprocess.Popen]) -> None:
    for burner in burners:
        burner.kill()
        burner.wait()


def one_run(name: str, rounds: int, peers: int, args: argparse.Namespace, out: Path) -> dict:
    command = [
        sys.executable, "-m", "peer.cli", "swarm", "--peers", str(peers), *CONFIGS[name],
        "--rounds", str(rounds), "--local-steps", str(args.local_steps), "--seed", str(args.seed),
        "--exchange-timeout", str(args.exchange_timeout), "--join-timeout", str(args.join_timeout),
        "--out", str(out),
    ]
    started = time.monotonic()
    try:
        finished = subprocess.run(command, check=False, capture_output=True, text=True, timeout=args.run_timeout)
        code, tail = finished.returncode, (finished.stderr or finished.stdout)[-400:]
    except subprocess.TimeoutExpired:
        code, tail = "timeout", ""
    result = {
        "config": name, "peers": peers, "rounds": rounds, "exit_code": code, "seconds": round(time.monotonic() - started, 1),
    }
    result |= analyse(out, peers)
    if code != 0:
        result["swarm_output"] = tail
    return result


def analyse(out: Path, peers: int) -> dict:
    """What the peers of the run in ``out`` refused, logged, and heard."""
    result = {
        "rejected_total": 0, "rejections": Counter(), "peers_without_summary": 0, "peers_alone": 0,
        "peers_heard_nobody": 0, **{key: 0 for key in PATTERNS}, "refusals": [],
    }
    for index in range(peers):
        folder = out / f"peer-{index}"
        summary_path, log_path = folder / "summary.json", folder / "log.txt"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            result["rejected_total"] += summary.get("rejected_total", 0)
            result["rejections"].update(summary.get("rejections", {}))
            if len(summary.get("peers_seen", [])) < peers:
                result["peers_alone"] += 1  # it never read every other peer's record
            if peers > 1 and not summary.get("bytes_received_total"):
                result["peers_heard_nobody"] += 1  # it trained alone: nothing reached it
        else:
            result["peers_without_summary"] += 1
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        for key, pattern in PATTERNS.items():
            result[key] += sum(pattern in line for line in log.splitlines())
        result["refusals"] += [
            f"peer-{index}: {line.strip()[-240:]}" for line in log.splitlines() if "rejected" in line or "ignoring " in line
        ][:5]
    result["rejections"] = dict(result["rejections"])
    return result


def totals(runs: list[dict]) -> dict:
    rejections = Counter()
    for run in runs:
        rejections.update(run["rejections"])
    keys = ["rejected_total", "peers_without_summary", "peers_alone", "peers_heard_nobody", *PATTERNS]
    return {
        "runs": len(runs),
        "runs_with_refusals": sum(run["rejected_total"] > 0 for run in runs),
        "failed_runs": sum(run["exit_code"] != 0 for run in runs),
        **{key: sum(run[key] for run in runs) for key in keys},
        "rejections": dict(rejections),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="runs of each configuration")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS),
        help=f"comma-separated, of {', '.join(CONFIGS)}, each with :ROUNDS to run other than --rounds",
    )
    parser.add_argument("--peers", default="3,4", help="peers per run, taken in turn: e.g. 3,4")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exchange-timeout", type=float, default=30.0)
    parser.add_argument("--join-timeout", type=float, default=120.0)
    parser.add_argument("--run-timeout", type=float, default=600.0, help="seconds before a run is given up")
    parser.add_argument("--burners", type=int, default=1, help="busy processes per CPU core while the swarms run (0: none)")
    parser.add_argument("--out", type=Path, default=None, help="where the runs' folders go (default: a temporary folder)")
    parser.add_argument("--progress", action="store_true", help="print each run's result to stderr as it ends")
    args = parser.parse_args()
    rounds: dict[str, int] = {}
    for spec in args.configs.split(","):
        name, _, count = spec.partition(":")
        if name not in CONFIGS or (count and not count.isdigit()):
            parser.error(f"unknown configuration {spec!r}; valid: {', '.join(CONFIGS)}, each with :ROUNDS or not")
        rounds[name] = int(count) if count else args.rounds
    names = list(rounds)
    sizes = [int(size) for size in args.peers.split(",")]
    out = args.out or Path(tempfile.mkdtemp(prefix="honest-soak-"))
    burners = start_burners(args.burners * (os.cpu_count() or 1))
    runs: list[dict] = []
    try:
        for index in range(args.runs):
            for name in names:
                run = one_run(name, rounds[name], sizes[index % len(sizes)], args, out / f"{name}-{index}")
                runs.append(run)
                if args.progress:
                    print(json.dumps({k: v for k, v in run.items() if k != "refusals"}), file=sys.stderr, flush=True)
    finally:
        stop_burners(burners)
    report = {
        "burners": len(burners), "rounds": rounds, "local_steps": args.local_steps, "out": str(out),
        "totals": {name: totals([run for run in runs if run["config"] == name]) for name in names},
        "runs": runs,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
