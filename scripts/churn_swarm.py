"""Peers crash, come back from their checkpoints, and a new one joins: real peer processes on
loopback, as in a swarm's life.

Starts a swarm, SIGKILLs some peers once the swarm reaches --kill-at, and once it reaches
--join-at restarts the first --resume of them with --resume (they go on from their last
checkpoint, written every round) and starts a new peer with --initial-peers (it must catch up:
pull a neighbour's model and round). Prints JSON: whether the survivors finished every round,
their accuracy when the peers died and at the end, and how the resumed peers and the newcomer
ended against them.

    python scripts/churn_swarm.py --peers 6 --rounds 60 --kill 2 --resume 1 --kill-at 20 --join-at 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from peer.config import SwarmConfig
from peer.net.swarm import LocalSwarm


def accuracy_at(swarm: LocalSwarm, index: int, round_: int) -> float | None:
    path = swarm.folder(index) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        if record["round"] >= round_ and record["accuracy"] is not None:
            return record["accuracy"]
    return None


def first_round(swarm: LocalSwarm, index: int) -> int | None:
    path = swarm.folder(index) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[0])["round"] if lines else None


def wait_for_round(swarm: LocalSwarm, indices: list[int], round_: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while max(swarm.last_round(i) for i in indices) < round_:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the swarm did not reach round {round_} within {timeout} s")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--kill", type=int, default=2)
    parser.add_argument("--resume", type=int, default=0, help="how many of the killed peers come back with --resume")
    parser.add_argument("--no-newcomer", action="store_true", help="start no new peer at --join-at")
    parser.add_argument("--kill-at", type=int, default=20)
    parser.add_argument("--join-at", type=int, default=30)
    parser.add_argument("--exchange-timeout", type=float, default=5.0)
    parser.add_argument("--record-ttl", type=float, default=10.0)
    parser.add_argument("--pace", type=float, default=0.5, help="seconds per round, so that a newcomer (which takes seconds to start) joins a running swarm")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    parser.add_argument("--out", type=Path, default=Path("runs/churn"))
    args = parser.parse_args()

    config = SwarmConfig(
        peers=args.peers, rounds=args.rounds, local_steps=args.local_steps, partition=args.partition,
        exchange_timeout=args.exchange_timeout, seed=0,
    )
    if not 0 <= args.resume <= args.kill:
        parser.error(f"--resume {args.resume} must be between 0 and --kill {args.kill}")
    extra = ("--record-ttl", str(args.record_ttl), "--pace", str(args.pace))
    swarm = LocalSwarm(config, args.out, extra_args=extra + (("--checkpoint-every", "1") if args.resume else ()))
    victims = list(range(1, 1 + args.kill))
    returning = victims[: args.resume]
    survivors = [i for i in range(args.peers) if i not in victims]
    newcomers = [] if args.no_newcomer else [args.peers]
    started = time.monotonic()
    try:
        swarm.bootstrap()
        wait_for_round(swarm, survivors, args.kill_at, args.timeout)
        for index in victims:
            swarm.kill(index)
        killed_at = max(swarm.last_round(i) for i in survivors)
        wait_for_round(swarm, survivors, args.join_at, args.timeout - (time.monotonic() - started))
        for index in returning:
            swarm.start(index, shard=index, min_peers=1, resume=True)
        for newcomer in newcomers:
            swarm.start(newcomer, shard=victims[-1] if victims else 0, min_peers=1)
        deadline = started + args.timeout
        while any(swarm.processes[i].poll() is None for i in survivors + returning + newcomers):
            if time.monotonic() > deadline:
                raise TimeoutError("the swarm did not finish in time")
            time.sleep(0.5)
    finally:
        swarm.stop()
    summaries = swarm.summaries()
    survivor_final = [summaries[i]["mean_accuracy"] for i in survivors if i in summaries]
    result = {
        "benchmark": "churn_swarm",
        "peers": args.peers, "rounds": args.rounds, "killed": victims, "killed_at_round": killed_at,
        "survivors_finished_every_round": all(
            i in summaries and summaries[i]["rounds_completed"] == args.rounds for i in survivors
        ),
        "survivor_exit_codes": [swarm.processes[i].returncode for i in survivors],
        "survivor_accuracy_when_killed": [accuracy_at(swarm, i, killed_at) for i in survivors],
        "survivor_accuracy_final": survivor_final,
        "survivor_missed_exchanges": [summaries[i]["missed_exchanges_total"] for i in survivors if i in summaries],
        "resumed": [
            {
                "peer": index,
                "exit_code": swarm.processes[index].returncode,
                "resumed_from_round": summaries.get(index, {}).get("resumed_from_round"),
                "rounds_completed": summaries.get(index, {}).get("rounds_completed"),
                "accuracy_final": summaries.get(index, {}).get("mean_accuracy"),
            }
            for index in returning
        ],
        "newcomers": [
            {
                "peer": index,
                "started_at_round": args.join_at,
                "first_round": first_round(swarm, index),
                "exit_code": swarm.processes[index].returncode,
                "accuracy_final": summaries.get(index, {}).get("mean_accuracy"),
            }
            for index in newcomers
        ],
        "survivor_accuracy_final_mean": statistics.mean(survivor_final) if survivor_final else None,
        "wall_seconds": time.monotonic() - started,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
