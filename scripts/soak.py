"""A long run of real peers, to see that nothing grows without bound.

Starts a swarm of --peers real peers on loopback for --rounds rounds at a fast pace, each
writing a checkpoint every --checkpoint-every rounds; every --restart-every rounds it SIGKILLs
the last peer and starts it again with --resume. Every --sample-every seconds it reads, for each
peer, the resident memory of its processes (the peer, its DHT process and the p2p daemon), their
open file descriptors, and from the peer's metrics the streams it is serving and the tasks on
its event loop. Prints JSON: the samples, and for each peer the growth of each figure from the
end of --warmup-rounds to the end of the run (for the restarted peer, within each of its lives).

    python scripts/soak.py --peers 4 --rounds 2000 --restart-every 400
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from peer.config import SwarmConfig
from peer.net.reaper import descendants
from peer.net.swarm import LocalSwarm

PAGE = 4096
MIN_SAMPLES = 5  # past warm-up, for a growth to be reported


def process_name(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    text = b" ".join(command).decode(errors="replace")
    if "p2pd" in text:
        return "daemon"
    if "peer.net.reaper" in text:
        return "watcher"
    return "python"


def resident_mb(pid: int) -> float:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * PAGE / 2**20


def open_fds(pid: int) -> int:
    try:
        return len(list(Path(f"/proc/{pid}/fd").iterdir()))
    except OSError:
        return 0


def scrape(port: int) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels}


def sample(swarm: LocalSwarm, index: int, port: int, started: float, life: int) -> dict:
    """One peer's figures now: memory and descriptors of each of its processes, and its own gauges."""
    root = swarm.processes[index].pid
    processes = {"peer": root}
    for pid in descendants(root):
        kind = process_name(pid)
        if kind == "python":
            processes.setdefault("dht", pid)  # the DHT process, forked from the peer
        elif kind == "daemon":
            processes["daemon"] = pid
    metrics = scrape(port)
    return {
        # In its run (not starting, nor saving and leaving at the end): the figures that count.
        "running": bool(metrics) and 0 <= swarm.last_round(index) < swarm.config.rounds - 1,
        "seconds": round(time.monotonic() - started, 1),
        "peer": index,
        "life": life,
        "round": swarm.last_round(index),
        "resident_mb": {kind: round(resident_mb(pid), 1) for kind, pid in processes.items()},
        "open_fds": {kind: open_fds(pid) for kind, pid in processes.items()},
        "streams_open": metrics.get("peer_streams_open"),
        "tasks": metrics.get("peer_tasks"),
    }


def growth(samples: list[dict], key, warmup_round: int) -> dict | None:
    """From the first tenth to the last tenth of the samples past warm-up (medians, to ride out
    one-off spikes): the figure at each end and its growth in percent."""
    values = [(s["round"], key(s)) for s in samples if s["round"] >= warmup_round and s["running"] and key(s) is not None]
    if len(values) < MIN_SAMPLES:
        return None
    tenth = max(1, len(values) // 10)
    first = statistics.median(v for _, v in values[:tenth])
    last = statistics.median(v for _, v in values[-tenth:])
    return {
        "from_round": values[0][0], "to_round": values[-1][0], "first": first, "last": last,
        "growth_percent": round(100 * (last - first) / first, 2) if first else None,
    }


def report(samples: list[dict], peers: int, warmup: int) -> dict:
    lives = sorted({(s["peer"], s["life"]) for s in samples})
    figures = {
        "resident_mb_total": lambda s: sum(s["resident_mb"].values()),
        "resident_mb_peer": lambda s: s["resident_mb"].get("peer"),
        "resident_mb_dht": lambda s: s["resident_mb"].get("dht"),
        "resident_mb_daemon": lambda s: s["resident_mb"].get("daemon"),
        "open_fds_total": lambda s: sum(s["open_fds"].values()),
        "streams_open": lambda s: s["streams_open"],
        "tasks": lambda s: s["tasks"],
    }
    result = {}
    for peer, life in lives:
        of_life = [s for s in samples if (s["peer"], s["life"]) == (peer, life)]
        # A resumed life warms up afresh from the round it resumed at.
        start = warmup if life == 0 else of_life[0]["round"] + warmup
        result[f"peer-{peer}" + (f"-life-{life}" if life else "")] = {
            name: growth(of_life, key, start) for name, key in figures.items()
        } | {"max_streams_open": max((s["streams_open"] or 0) for s in of_life),
             "max_tasks": max((s["tasks"] or 0) for s in of_life),
             "max_open_fds_total": max(sum(s["open_fds"].values()) for s in of_life)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument("--pace", type=float, default=0.2, help="minimum seconds per round")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--restart-every", type=int, default=400, help="rounds between kills of the last peer (0: none)")
    parser.add_argument("--warmup-rounds", type=int, default=200)
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--metrics-port", type=int, default=29400)
    parser.add_argument("--timeout", type=float, default=7200.0)
    parser.add_argument("--out", type=Path, default=Path("runs/soak"))
    args = parser.parse_args()

    config = SwarmConfig(
        peers=args.peers, rounds=args.rounds, local_steps=args.local_steps, partition="iid", eval_every=args.eval_every,
        exchange_timeout=2.0, metrics_port=args.metrics_port, seed=0,
    )
    extra = ("--pace", str(args.pace), "--record-ttl", "6", "--checkpoint-every", str(args.checkpoint_every))
    swarm = LocalSwarm(config, args.out, extra_args=extra)
    restarted = args.peers - 1
    lives = dict.fromkeys(range(args.peers), 0)
    samples: list[dict] = []
    restarts: list[dict] = []
    started = time.monotonic()
    next_sample = started
    try:
        swarm.bootstrap()
        next_kill = args.restart_every or None
        while any(swarm.processes[i].poll() is None for i in range(args.peers)):
            if time.monotonic() - started > args.timeout:
                raise TimeoutError(f"the swarm did not finish within {args.timeout} s")
            now_round = swarm.last_round(0)
            # The last peer is killed again only once it is back in the run (it has recorded a round
            # past the one it was killed at), and not so near the end that the others finish first.
            back = not restarts or swarm.last_round(restarted) > restarts[-1]["killed_at_round"]
            if next_kill is not None and back and now_round >= next_kill and next_kill < args.rounds - args.restart_every // 2:
                swarm.kill(restarted)
                killed_at = swarm.last_round(restarted)
                swarm.start(restarted, shard=restarted, min_peers=1, resume=True)
                lives[restarted] += 1
                restarts.append({"killed_at_round": killed_at, "swarm_round": now_round})
                next_kill += args.restart_every
            if time.monotonic() >= next_sample:
                for index in range(args.peers):
                    if swarm.processes[index].poll() is None:
                        samples.append(sample(swarm, index, args.metrics_port + index, started, lives[index]))
                next_sample += args.sample_every
            time.sleep(0.2)
    finally:
        swarm.stop()
    summaries = swarm.summaries()
    result = {
        "benchmark": "soak",
        "peers": args.peers,
        "rounds": args.rounds,
        "pace": args.pace,
        "wall_seconds": round(time.monotonic() - started, 1),
        "exit_codes": [swarm.processes[i].returncode for i in range(args.peers)],
        "rounds_completed": [summaries.get(i, {}).get("rounds_completed") for i in range(args.peers)],
        "accuracy": [summaries.get(i, {}).get("mean_accuracy") for i in range(args.peers)],
        "restarts": restarts,
        "resumed_from_round": summaries.get(restarted, {}).get("resumed_from_round"),
        "growth_after_warmup": report(samples, args.peers, args.warmup_rounds),
        "samples": samples,
    }
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
