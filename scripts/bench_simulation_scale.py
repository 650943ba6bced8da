"""How local training scales with the number of simulated peers: the per-peer engine against the
batched one (peer.sim.batched), measured side by side on MNIST-1D, Dirichlet(0.5), batch 32.

For each --peers count, peer-steps per second of:

- ``per_peer_1_thread``: each Trainer trains alone, torch with 1 thread (at N >= 1000 only the
  first --per-peer-sample peers are timed: ``per_peer_peers_timed``);
- ``per_peer_intra_op``: the same with torch on --threads threads (what ``--engine auto`` picks
  on a CPU for a model whose step is big enough to keep every core busy);
- ``batched_intra_op``: one vmapped step over the stack, torch with --threads threads, 1 worker;
- ``batched_split``: the stack split over --threads workers, torch with 1 thread each;
- at N >= 256, ``batched_split`` again with each chunk size of --chunks (peers per vmapped pass).

Each measurement runs in its own subprocess (fresh trainers, not timed; one warm-up round, not
timed; then --rounds rounds of --local-steps steps per peer), so ``peak_rss_mb`` is its own peak
resident memory. Also: the FLOPs of one per-peer step (forward and backward, FlopCounterMode),
each engine's achieved GFLOP/s, a float32 1024x1024 matmul's GFLOP/s with --threads threads
(``fraction_of_matmul_peak``: the best batched GFLOP/s over it; ``auto_engine`` and
``auto_fraction_of_matmul_peak``: the mode that ``--engine auto`` picks and its fraction), and the milliseconds that
``evaluate()`` takes per model on the test set, alone (1 and --threads torch threads) and on the
batched engine (the test set split over --threads workers). Prints JSON.

    python scripts/bench_simulation_scale.py [--peers 16 100 1000]
    python scripts/bench_simulation_scale.py --task cifar10 --data-dir ../shared/data --peers 16 100 --local-steps 2 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from peer.config import SimulationConfig
from peer.flops import matmul_flop_rate, step_flops
from peer.sim.batched import CHUNK_PEERS, BatchedTraining, StackedTrainer
from peer.simulate import build_trainers, training_engine
from peer.tasks import load_task
from peer.trainer import Trainer

BATCH_SIZE = 32
SAMPLE_FROM = 1000  # per-peer runs with at least this many peers time only --per-peer-sample of them
WARM_PEERS = 8  # per-peer peers warmed up when only a sample is timed
CHUNKS_FROM = 256  # peer counts from which chunk sizes are compared


def config_for(task: str, peers: int, local_steps: int, data_dir: str | None = None) -> SimulationConfig:
    return SimulationConfig(peers=peers, task=task, partition="dirichlet:0.5", local_steps=local_steps, rounds=100,
                            seed=0, batch_size=BATCH_SIZE, data_dir=data_dir)


def measure(spec: dict) -> dict:
    """One (peer count, engine) measurement, run in a child process: peer-steps per second and peak memory."""
    torch.set_num_threads(spec["threads"])
    steps, rounds = spec["local_steps"], spec["rounds"]
    config = config_for(spec["task"], spec["peers"], steps, spec["data_dir"])
    batched = spec["workers"] > 0
    trainers = build_trainers(config, load_task(config.task, config.data_dir), torch.device("cpu"),
                              trainer_class=StackedTrainer if batched else Trainer)
    if batched:
        engine = BatchedTraining(trainers, workers=spec["workers"], chunk=spec["chunk"])
        work = [(trainer, steps) for trainer in trainers]
        engine.run(work)  # warm-up
        before, started = engine.peer_steps, time.perf_counter()
        for _ in range(rounds):
            engine.run(work)
        seconds, peer_steps = time.perf_counter() - started, engine.peer_steps - before
        engine.close()
        timed = trainers
    else:
        timed = trainers[: spec["sample"]] if len(trainers) >= SAMPLE_FROM else trainers
        for trainer in timed if len(timed) == len(trainers) else timed[:WARM_PEERS]:
            trainer.train(steps)  # warm-up
        started = time.perf_counter()
        for _ in range(rounds):
            for trainer in timed:
                trainer.train(steps)
        seconds, peer_steps = time.perf_counter() - started, len(timed) * steps * rounds
    return {"peer_steps_per_second": peer_steps / seconds, "peer_steps": peer_steps, "seconds": seconds,
            "peers_timed": len(timed), "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux carries the forking parent's peak across exec into
    ru_maxrss, so the process's own high-water mark (VmHWM) is read where /proc has it."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def in_child(args: argparse.Namespace, peers: int, threads: int, workers: int, chunk: int = CHUNK_PEERS) -> dict:
    spec = {"task": args.task, "data_dir": args.data_dir, "peers": peers, "local_steps": args.local_steps, "rounds": args.rounds,
            "threads": threads, "workers": workers, "chunk": chunk, "sample": args.per_peer_sample}
    done = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)],
                          stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout)


def auto_engine(args: argparse.Namespace, flops: int) -> str:
    """The mode that --engine auto runs for this task on a CPU."""
    config = config_for(args.task, 2, args.local_steps, args.data_dir)
    task = load_task(config.task, config.data_dir)
    return "batched_split" if training_engine(config, task, torch.device("cpu"), flops) is None else "per_peer_intra_op"


def matmul_gflops(threads: int) -> float:
    torch.set_num_threads(threads)
    return matmul_flop_rate(torch.device("cpu")) / 1e9


def evaluate_ms(args: argparse.Namespace, peers: int, models: int = 3) -> dict:
    """Mean milliseconds per model of an evaluation on the whole test set: a trainer alone with 1 and with
    --threads torch threads, and the batched engine's, which splits the test set over --threads workers."""
    config = config_for(args.task, peers, args.local_steps, args.data_dir)
    task = load_task(config.task, config.data_dir)
    alone = build_trainers(config, task, torch.device("cpu"))[:models]
    stacked = build_trainers(config, task, torch.device("cpu"), trainer_class=StackedTrainer)
    engine = BatchedTraining(stacked, workers=args.threads)
    result = {"peers": peers, "models": len(alone), "test_samples": len(task.test_y)}
    for key, threads, trainers in (
        ("alone_1_thread", 1, alone), ("alone_intra_op", args.threads, alone), ("batched_split", 1, stacked[:models])
    ):
        torch.set_num_threads(threads)
        trainers[0].evaluate()  # warm-up
        started = time.perf_counter()
        for trainer in trainers:
            trainer.evaluate()
        result[key] = 1000 * (time.perf_counter() - started) / len(trainers)
    engine.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[16, 100, 1000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--per-peer-sample", type=int, default=200)
    parser.add_argument("--task", default="mnist1d:64000")
    parser.add_argument("--data-dir", default=None, help="folder holding the task's files (e.g. ../shared/data)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement, as JSON, in a child
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    started = time.perf_counter()
    # Loading the task also generates or decodes and caches it before the children load it.
    flops = step_flops(load_task(args.task, Path(args.data_dir) if args.data_dir else None), BATCH_SIZE)
    auto = auto_engine(args, flops)
    peak = matmul_gflops(args.threads)
    results, best_batched_gflops = [], 0.0
    for peers in args.peers:
        runs = {
            "per_peer_1_thread": in_child(args, peers, threads=1, workers=0),
            "per_peer_intra_op": in_child(args, peers, threads=args.threads, workers=0),
            "batched_intra_op": in_child(args, peers, threads=args.threads, workers=1),
            "batched_split": in_child(args, peers, threads=1, workers=args.threads),
        }
        timed = runs["per_peer_1_thread"]["peers_timed"]
        for run in runs.values():
            del run["peers_timed"]
            run["gflops"] = flops * run["peer_steps_per_second"] / 1e9
            run["fraction_of_matmul_peak"] = run["gflops"] / peak
        faster = max(("batched_intra_op", "batched_split"), key=lambda mode: runs[mode]["peer_steps_per_second"])
        best_batched_gflops = max(best_batched_gflops, runs[faster]["gflops"])
        entry = {
            "peers": peers, **runs,
            "per_peer_peers_timed": timed,
            "speedup_batched_over_per_peer":
                runs[faster]["peer_steps_per_second"] / runs["per_peer_1_thread"]["peer_steps_per_second"],
            "faster_batched_mode": faster,
            "fastest_mode": max(runs, key=lambda mode: runs[mode]["peer_steps_per_second"]),
            "auto_engine": auto,
            "auto_fraction_of_matmul_peak": runs[auto]["fraction_of_matmul_peak"],
        }
        if peers >= CHUNKS_FROM:
            by_chunk = {}
            for chunk in args.chunks:
                run = in_child(args, peers, threads=1, workers=args.threads, chunk=chunk)
                by_chunk[str(chunk)] = {key: run[key] for key in ("peer_steps_per_second", "peak_rss_mb")}
            entry["batched_split_by_chunk"] = by_chunk
        results.append(entry)
    evaluation = evaluate_ms(args, min(args.peers))
    print(json.dumps({
        "benchmark": "simulation_scale",
        "task": args.task, "partition": "dirichlet:0.5", "batch_size": BATCH_SIZE, "local_steps": args.local_steps,
        "rounds": args.rounds, "threads": args.threads, "default_chunk": CHUNK_PEERS,
        "machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "flops_per_step": flops,
        "matmul_1024_gflops": peak, "best_batched_gflops": best_batched_gflops,
        "fraction_of_matmul_peak": best_batched_gflops / peak,
        "results": results,
        "evaluate_ms_per_model": evaluation,
        "wall_seconds": time.perf_counter() - started,
    }, indent=2))


if __name__ == "__main__":
    main()
