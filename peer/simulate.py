"""`peer simulate`: many peers in one process on an emulated network and a virtual clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gossip.neighbourhood import GraphNeighbourhood
from gossip.protocols import GOSSIP_PROTOCOLS, FedAvgClient, FedAvgServer, ProtocolContext
from peer.config import SimulationConfig
from peer.curve import time_to_target
from peer.metrics import ConsensusByRound, MetricsLog, RoundRecord, consensus_distance, prepare_out, write_json_atomic
from peer.runtime import PeerNode
from peer.sim import LinkModel, SimClock, SimNetwork, SpeedProfile, VirtualTimeLoop
from peer.tasks import Task, load_task, partition
from peer.trainer import Trainer, peer_trainer, resolve_device
from topology import parse_topology

SERVER_ID = "server"
LABELS = {
    "dpsgd": "D-PSGD (decentralised gossip)",
    "dfedsam": "DFedSAM (sharpness-aware local steps, decentralised gossip)",
    "fedavg": "FedAvg (centralised reference, simulation only)",
}


@dataclass
class SimulationResult:
    summary: dict[str, Any]
    final: list[RoundRecord]  # each peer's last record
    compute_wall_seconds: float  # wall time spent training and evaluating, the rest is the simulator's


def peer_ids(n: int) -> list[str]:
    width = len(str(n - 1))
    return [f"peer-{i:0{width}d}" for i in range(n)]


def build_trainers(config: SimulationConfig, task: Task, device: torch.device) -> list[Trainer]:
    shards = partition(task.train_y, config.peers, config.partition, config.seed)
    return [peer_trainer(config, task, shard, index, device) for index, shard in enumerate(shards)]


def simulate(config: SimulationConfig, on_record: Callable[[RoundRecord], None] | None = None) -> SimulationResult:
    """Run a whole simulation; raises TaskError, PartitionError, TopologyError or ValueError on bad input."""
    if config.out:
        prepare_out(config.out)
    torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    topology = parse_topology(config.topology, config.peers, weights=config.weights, seed=config.seed)
    task = load_task(config.task, config.data_dir)
    trainers = build_trainers(config, task, device)
    ids = peer_ids(config.peers)

    metrics = MetricsLog(config.out / "metrics.jsonl" if config.out else None)
    consensus = ConsensusByRound(config.peers)
    trainer_of = dict(zip(ids, trainers))

    def recorded(record: RoundRecord) -> None:
        # Called as the peer finishes its round, before it trains again: its model is the round's.
        if record.accuracy is not None:
            consensus.add(record.round, trainer_of[record.peer].state())
        if on_record:
            on_record(record)

    network = SimNetwork(
        LinkModel(config.link_latency, config.link_bandwidth * 1e6 / 8, config.link_loss), seed=config.seed
    )
    clock = SimClock(SpeedProfile(config.step_time))
    # A round cannot take longer than its training plus this, so it bounds a FedAvg round.
    round_timeout = config.exchange_timeout + config.local_steps * config.step_time

    gossip = config.gossip_settings()
    nodes = []
    for peer_id, trainer in zip(ids, trainers):
        node = PeerNode(
            network.attach(peer_id), clock, trainer, metrics,
            rounds=config.rounds, eval_every=config.eval_every, on_record=recorded,
        )
        context = ProtocolContext(node.transport, clock, trainer, None, node.round_finished, gossip)
        if config.algorithm in GOSSIP_PROTOCOLS:
            context.neighbourhood = GraphNeighbourhood(topology, ids, peer_id)
            node.protocol = GOSSIP_PROTOCOLS[config.algorithm](
                context, local_steps=config.local_steps, gossip_steps=config.gossip_steps
            )
        else:
            node.protocol = FedAvgClient(
                context, server=SERVER_ID, local_steps=config.local_steps, round_timeout=2 * round_timeout
            )
        nodes.append(node)

    async def run_all() -> float:
        if config.algorithm == "fedavg":
            FedAvgServer(
                network.attach(SERVER_ID), clock, trainers[0].state(), peers=config.peers, timeout=round_timeout
            )
        await asyncio.gather(*(node.run() for node in nodes))
        return asyncio.get_running_loop().time()

    started = time.perf_counter()
    try:
        with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
            virtual_seconds = runner.run(run_all())
    finally:
        metrics.close()
    wall_seconds = time.perf_counter() - started

    final = [metrics.latest[peer_id] for peer_id in ids]
    gossiping = config.algorithm in GOSSIP_PROTOCOLS
    accuracies = [record.accuracy for record in final]
    summary = {
        "algorithm": config.algorithm,
        "label": LABELS[config.algorithm],
        "task": config.task,
        "topology": config.topology if gossiping else "server",
        "spectral_gap": topology.spectral_gap() if gossiping else 1.0,
        "partition": config.partition,
        "peers": config.peers,
        "rounds": config.rounds,
        "local_steps": config.local_steps,
        "batch_size": config.batch_size,
        "lr": trainers[0].lr,
        "seed": config.seed,
        "init": config.init,
        "mixing": config.mixing,
        "gossip_steps": config.gossip_steps if gossiping else None,
        "sam_rho": config.sam_rho if config.algorithm == "dfedsam" else None,
        "codec": gossip.codec,
        "error_feedback": gossip.error_feedback,
        "consensus_step": gossip.consensus_step,
        "device": str(device),
        "mean_accuracy": sum(accuracies) / len(accuracies),
        "min_accuracy": min(accuracies),
        "max_accuracy": max(accuracies),
        "mean_loss": sum(record.loss for record in final) / len(final),
        "consensus_distance": consensus_distance([trainer.state() for trainer in trainers]),
        "bytes_sent_total": sum(record.bytes_sent for record in final),
        "bytes_received_total": sum(record.bytes_received for record in final),
        "missed_exchanges_total": metrics.missed_exchanges,
        "rejected_total": sum(record.rejected for record in final),
        "virtual_seconds": virtual_seconds,
        "wall_seconds": wall_seconds,
        **time_to_target(metrics.curve.points(), config.target_accuracy, wall_clock=False),
        "consensus_by_round": [[round_, distance] for round_, distance in consensus.distances()],
    }
    if config.out:
        write_json_atomic(config.out / "summary.json", summary)
    return SimulationResult(summary, final, clock.compute_wall_seconds)
