"""`peer simulate`: many peers in one process on an emulated network and a virtual clock."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from gossip.neighbourhood import GraphNeighbourhood
from gossip.protocols import GOSSIP_PROTOCOLS, SRRW, AsyncGossip, FedAvgClient, FedAvgServer, MoDeST, ProtocolContext
from peer.config import SimulationConfig
from peer.curve import LatestAccuracies, time_to_target
from peer.metrics import ConsensusByRound, MetricsLog, RoundRecord, consensus_distance, prepare_out, write_json_atomic
from peer.runtime import PeerNode
from peer.sim import LinkModel, SimClock, SimNetwork, SpeedProfile, VirtualTimeLoop
from peer.sim.batched import CHUNK_PEERS, BatchedTraining, BatchingError, StackedTrainer, batching_refusal
from peer.sim.byzantine import Adversary, Attacker, HonestModels, choose_attackers, parse_byzantine
from peer.sim.faults import parse_faults
from peer.tasks import Task, load_task, partition
from peer.trainer import Trainer, peer_trainer, resolve_device, split_optimum
from topology import parse_topology

log = logging.getLogger(__name__)

SERVER_ID = "server"
LABELS = {
    "dpsgd": "D-PSGD (decentralised gossip)",
    "dfedsam": "DFedSAM (sharpness-aware local steps, decentralised gossip)",
    "modest": "MoDeST (decentralised sampling)",
    "fedavg": "FedAvg (centralised reference, simulation only)",
    "srrw": "SRRW (self-repellent random-walk token)",
    "async-gossip": "Asynchronous gossip (no rounds, staleness-weighted mixing)",
}
# Protocols whose round ends in one model (the aggregate, or a token's), which is what their records report.
ROUND_MODEL_PROTOCOLS = ("modest", "fedavg", "srrw")


@dataclass
class SimulationResult:
    summary: dict[str, Any]
    final: list[RoundRecord]  # the last records: each live peer's, or the last round's model's
    compute_wall_seconds: float  # wall time spent training and evaluating, the rest is the simulator's


def peer_ids(n: int) -> list[str]:
    width = len(str(n - 1))
    return [f"peer-{i:0{width}d}" for i in range(n)]


def build_trainers(
    config: SimulationConfig, task: Task, device: torch.device, peers: int | None = None,
    trainer_class: type[Trainer] = Trainer,
) -> list[Trainer]:
    """A trainer for each of ``peers`` (default: the run's), on its share of the training set.

    A task with an exact optimum (a convex one) gets it computed once for this split, and every
    trainer reports its distance to it."""
    shards = partition(task.train_y, peers or config.peers, config.partition, config.seed, owners=task.owners)
    optimum = split_optimum(config, task, shards)
    return [
        peer_trainer(config, task, shard, index, device, optimum, trainer_class) for index, shard in enumerate(shards)
    ]


def training_engine(config: SimulationConfig, task: Task) -> str | None:
    """Why the run's peers train one by one (--engine per-peer, or a model that cannot be batched),
    or None when they train as one batched step; --engine batched with such a model is an error."""
    if config.engine == "per-peer":
        return "--engine per-peer"
    refusal = batching_refusal(task.make_model(), task.train_x[:4])
    if refusal and config.engine == "batched":
        raise BatchingError(f"--engine batched: {refusal}; use --engine per-peer (or auto) for this model")
    if refusal:
        log.warning("each peer trains alone (slower): %s", refusal)
    return refusal


def simulate(config: SimulationConfig, on_record: Callable[[RoundRecord], None] | None = None) -> SimulationResult:
    """Run a whole simulation; raises TaskError, PartitionError, TopologyError or ValueError on bad input."""
    if config.out:
        prepare_out(config.out)
    world = World(config, on_record)
    started = time.perf_counter()
    try:
        with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
            virtual_seconds = runner.run(world.run())
    finally:
        world.close()
    summary, final = world.summary(virtual_seconds, time.perf_counter() - started)
    if config.out:
        write_json_atomic(config.out / "summary.json", summary)
    compute = sum(clock.compute_wall_seconds for clock in world.clocks.values())
    return SimulationResult(summary, final, compute + (world.engine.wall_seconds if world.engine else 0.0))


class World:
    """The simulated swarm: its peers, the network between them, and the faults it replays."""

    def __init__(self, config: SimulationConfig, on_record: Callable[[RoundRecord], None] | None = None):
        self.config = config
        self.on_record = on_record
        self.faults = parse_faults(config.faults, rounds=config.rounds, algorithm=config.algorithm)
        self.device = resolve_device(config.device)
        self.ids = peer_ids(config.peers + config.newcomers())
        self.initial, self.newcomers = self.ids[: config.peers], list(self.ids[config.peers :])
        attack = parse_byzantine(config.byzantine)
        self.attackers = choose_attackers(attack, self.initial, config.seed) if attack else frozenset()
        self.gossiping = config.algorithm in GOSSIP_PROTOCOLS
        self.walking = config.algorithm == "srrw"
        self.asynchronous = config.algorithm == "async-gossip"
        self.mixing_neighbours = self.gossiping or self.asynchronous  # with or without rounds
        # Newcomers have their place on the graph and their share of the data from the start.
        self.topology = parse_topology(config.topology, len(self.ids), weights=config.weights, seed=config.seed)
        if self.walking:
            self.topology.walk_row(0, config.srrw_stay)  # a graph the token cannot walk is refused now
        self.task = load_task(config.task, config.data_dir, peers=len(self.ids))
        self.per_peer_reason = training_engine(config, self.task)
        batched = self.per_peer_reason is None
        trainers = build_trainers(
            config, self.task, self.device, len(self.ids), StackedTrainer if batched else Trainer
        )
        # The batched engine splits the stack over the threads, each computing alone; one model trains on all.
        self.threads = config.compute_threads(batched)
        torch.set_num_threads(1 if batched else self.threads)
        # A GPU takes the whole stack at once, from one thread.
        on_cpu = self.device.type == "cpu"
        self.engine = BatchedTraining(
            trainers, workers=self.threads if on_cpu else 1, chunk=CHUNK_PEERS if on_cpu else len(trainers)
        ) if batched else None
        self.trainers = dict(zip(self.ids, trainers))
        honest = config.peers - len(self.attackers)
        self.metrics = MetricsLog(
            config.out / "metrics.jsonl" if config.out else None,
            curve=LatestAccuracies(honest) if self.asynchronous else None,
        )
        self.consensus = ConsensusByRound(None if self.faults else honest)
        self.network = SimNetwork(
            LinkModel(config.link_latency, config.link_bandwidth * 1e6 / 8, config.link_loss), seed=config.seed
        )
        self.speeds = config.peer_speeds()
        self.slow = frozenset(self.ids[i] for i in self.speeds.slow())
        # Each peer computes at its own speed; the server (FedAvg) at --step-time.
        self.clock = SimClock(SpeedProfile(config.step_time))
        self.clocks = {SERVER_ID: self.clock} | {
            peer: SimClock(SpeedProfile(seconds, self.speeds.jitter), seed=f"{config.seed}:{peer}", engine=self.engine)
            for peer, seconds in zip(self.ids, self.speeds.step_times)
        }
        self.gossip = config.gossip_settings()
        self.nodes: dict[str, PeerNode] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.gone: set[str] = set()  # crashed or left
        self.last_round = -1  # the highest round anybody has recorded
        self.last_record_at = 0.0
        self.stalled = False
        self.stopped_at_target = False
        self._fired = 0  # faults applied so far, in round order
        self._background: set[asyncio.Task] = set()
        self.walkers: list[SRRW] = []  # every token-walk protocol started, restarted peers' included
        # A round cannot take longer than its training plus this, so it bounds a FedAvg round.
        self.round_timeout = config.exchange_timeout + config.local_steps * max(self.speeds.step_times)
        self.adversary = Adversary(
            attack, self.attackers, self.topology, self.ids, HonestModels(self.trainers[self.ids[0]].state()),
            live=lambda peer: peer in self.nodes and peer not in self.gone, seed=config.seed,
        ) if attack else None

    def close(self) -> None:
        self.metrics.close()
        if self.engine:
            self.engine.close()

    def _node(self, peer_id: str, trainer: Trainer, transport, *, joining: bool) -> PeerNode:
        config = self.config
        clock = self.clocks[peer_id]
        node = PeerNode(
            transport, clock, trainer, self.metrics, rounds=config.rounds, eval_every=config.eval_every,
            on_record=self._recorded, swarm_bytes=self.network.bytes_sent,
        )
        context = ProtocolContext(
            transport, clock, trainer, None, node.round_finished, self.gossip, deadline=config.duration
        )
        if self.asynchronous:
            context.neighbourhood = self._neighbourhood(peer_id)
            node.protocol = AsyncGossip(
                context, local_steps=config.local_steps, adaptive=config.adaptive_steps, joining=joining
            )
        elif self.gossiping:
            context.neighbourhood = self._neighbourhood(peer_id)
            node.protocol = GOSSIP_PROTOCOLS[config.algorithm](
                context, local_steps=config.local_steps, gossip_steps=config.gossip_steps, joining=joining,
                mix_start=config.mix_point == "start",
            )
        elif self.walking:
            context.neighbourhood = self._neighbourhood(peer_id)
            node.protocol = SRRW(
                context, local_steps=config.local_steps, settings=config.walk_settings(), peers=self.initial,
                seed=config.seed, joining=joining,
            )
            self.walkers.append(node.protocol)
        elif config.algorithm == "modest":
            settings = config.modest_settings()
            if config.sample_size is None:
                settings = replace(settings, sample_size=min(settings.sample_size, config.peers))
            node.protocol = MoDeST(
                context, local_steps=config.local_steps, settings=settings, peers=self.initial, joining=joining
            )
        else:
            node.protocol = FedAvgClient(context, server=SERVER_ID, local_steps=config.local_steps, joining=joining)
        return node

    def _neighbourhood(self, peer_id: str) -> GraphNeighbourhood:
        """Its place on the graph; the newcomers that have not joined yet are not there."""
        neighbourhood = GraphNeighbourhood(self.topology, self.ids, peer_id)
        for newcomer in self.newcomers:
            neighbourhood.departed(newcomer)
        return neighbourhood

    def _attacker(self, peer_id: str, transport) -> PeerNode:
        config = self.config
        trainer = self.trainers[peer_id]  # never trained: it gives the layout of the models to craft
        clock = self.clocks[peer_id]
        node = PeerNode(transport, clock, trainer, self.metrics, rounds=config.rounds, eval_every=config.eval_every)
        neighbourhood = GraphNeighbourhood(self.topology, self.ids, peer_id)
        context = ProtocolContext(transport, clock, trainer, neighbourhood, node.round_finished, self.gossip)
        node.protocol = Attacker(context, self.adversary, gossip_steps=config.gossip_steps)
        return node

    def _start(self, peer_id: str, *, joining: bool) -> None:
        transport = self.network.restart(peer_id) if peer_id in self.gone else self.network.attach(peer_id)
        self.gone.discard(peer_id)
        if peer_id in self.attackers:
            node = self._attacker(peer_id, transport)
        else:
            # The attackers see every model an honest peer sends.
            transport = self.adversary.tap(transport) if self.adversary else transport
            node = self._node(peer_id, self.trainers[peer_id], transport, joining=joining)
        self.nodes[peer_id] = node
        self.tasks[peer_id] = asyncio.get_running_loop().create_task(node.run())

    def _start_server(self) -> None:
        config = self.config
        # The server holds the global model; it starts as the peers' model does with --init same.
        trainer = peer_trainer(config, self.task, np.arange(0), 0, self.device)
        transport = self.network.attach(SERVER_ID)
        node = PeerNode(
            transport, self.clock, trainer, self.metrics, rounds=config.rounds, eval_every=config.eval_every,
            on_record=self._recorded, swarm_bytes=self.network.bytes_sent,
        )
        context = ProtocolContext(transport, self.clock, trainer, None, node.round_finished, self.gossip)
        node.protocol = FedAvgServer(
            context, clients=self.initial, sample_size=config.sample_size, local_steps=config.local_steps,
            round_timeout=2 * self.round_timeout, seed=config.seed,
        )
        self.tasks[SERVER_ID] = asyncio.get_running_loop().create_task(node.run())

    def _recorded(self, record: RoundRecord) -> None:
        # Called as the peer finishes its round, before it trains again: its model is the round's.
        if self.gossiping and record.accuracy is not None:
            self.consensus.add(record.round, self.trainers[record.peer].state())
        self.last_round = max(self.last_round, record.round)
        self.last_record_at = self.clock.now()
        self._fire_faults(completed=record.round + 1, recorder=record.peer)
        if self.on_record:
            self.on_record(record)
        if self.config.stop_at_target and record.accuracy is not None and self._reached_target(record.round):
            self.stopped_at_target = True
            for task in self.tasks.values():
                task.cancel()

    def _reached_target(self, round_: int) -> bool:
        if self.asynchronous:
            latest = self.metrics.curve.latest()
            return latest is not None and latest.mean_accuracy >= self.config.target_accuracy
        point = self.metrics.curve.point(round_)
        # A gossip round counts once every live peer has evaluated it; an aggregate counts at once.
        complete = not self.gossiping or point.peers >= len(self._honest_up())
        return complete and point.mean_accuracy >= self.config.target_accuracy

    def _fire_faults(self, completed: int, recorder: str | None = None) -> None:
        """Apply every fault due once ``completed`` rounds are done (at round R: when round R - 1 is);
        ``recorder`` is the peer whose record completed them (with a token walk, the token's holder)."""
        while self._fired < len(self.faults) and self.faults[self._fired].round <= completed:
            fault, index = self.faults[self._fired], self._fired
            self._fired += 1
            if fault.kind == "join":
                for _ in range(int(fault.amount)):
                    self._start(self.newcomers.pop(0), joining=True)
                continue
            if fault.kind == "heal":
                self.network.heal()
                continue
            if fault.kind == "crash-holder":
                if recorder is not None and recorder not in self.gone:
                    self.gone.add(recorder)
                    self._crash(recorder)
                    self._later(fault.amount, lambda peer=recorder: self._start(peer, joining=True))
                continue
            up = [peer for peer in self.nodes if peer not in self.gone]
            if fault.kind == "partition":
                self.network.cut(fault.victims(up, self.config.seed, index))
                continue
            for peer in fault.victims(up, self.config.seed, index):
                self.gone.add(peer)
                if fault.kind == "crash":
                    self._crash(peer)
                else:
                    task = asyncio.get_running_loop().create_task(self._leave(peer))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)

    def _later(self, seconds: float, action: Callable[[], None]) -> None:
        async def wait_then_act() -> None:
            await asyncio.sleep(seconds)
            action()

        task = asyncio.get_running_loop().create_task(wait_then_act())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _crash(self, peer: str) -> None:
        self.network.crash(peer)
        self.tasks[peer].cancel()

    async def _leave(self, peer: str) -> None:
        await self.nodes[peer].protocol.leave()
        self._crash(peer)  # gone for good once its goodbye is on the wire

    async def run(self) -> float:
        for peer_id in self.initial:
            self._start(peer_id, joining=False)
        if self.config.algorithm == "fedavg":
            self._start_server()
        self._fire_faults(completed=0)
        watchdog = asyncio.get_running_loop().create_task(self._watch_for_stall())
        try:
            while pending := [task for task in self.tasks.values() if not task.done()]:
                await asyncio.wait(pending)
        finally:
            watchdog.cancel()
            for task in self.tasks.values():
                task.cancel()
        return asyncio.get_running_loop().time()

    async def _watch_for_stall(self) -> None:
        """End a run in which no round completes any more (every peer that could go on is gone)."""
        patience = 10 * max(self.round_timeout, self.config.round_timeout)
        while True:
            await asyncio.sleep(patience)
            if self.clock.now() - self.last_record_at >= patience:
                self.stalled = True
                for task in self.tasks.values():
                    task.cancel()
                return

    def _honest_up(self) -> list[str]:
        """The peers running now that are not attackers: those whose models a run reports."""
        return [peer for peer in self.nodes if peer not in self.gone and peer not in self.attackers]

    def summary(self, virtual_seconds: float, wall_seconds: float) -> tuple[dict[str, Any], list[RoundRecord]]:
        config, gossip = self.config, self.gossip
        points = self.metrics.curve.points()
        live = self._honest_up()
        if config.algorithm in ROUND_MODEL_PROTOCOLS:
            final = [record for record in self.metrics.latest.values() if record.round == self.last_round]
        else:
            final = [self.metrics.latest[peer] for peer in live if peer in self.metrics.latest]
        accuracies = [record.accuracy for record in final if record.accuracy is not None]
        summary = {
            "algorithm": config.algorithm,
            "label": LABELS[config.algorithm],
            "task": config.task,
            "topology": config.topology if self.mixing_neighbours or self.walking else (
                "sampled" if config.algorithm == "modest" else "server"
            ),
            "spectral_gap": self.topology.spectral_gap() if self.mixing_neighbours else None,
            "partition": config.partition,
            "peers": config.peers,
            "rounds": config.rounds,
            "rounds_completed": self.last_round + 1,
            "local_steps": f"adaptive:{config.local_steps}" if config.adaptive_steps else config.local_steps,
            "local_steps_total": self.metrics.local_steps,
            "batch_size": config.batch_size,
            "lr": self.trainers[self.ids[0]].lr,
            "seed": config.seed,
            "init": config.init,
            "mixing": config.mixing,
            "gossip_steps": config.gossip_steps if self.gossiping else None,
            "mix_point": config.mix_point if self.gossiping else None,
            "sam_rho": config.sharpness_radius() or None,
            "sample_size": self._sample_size(),
            "aggregators": config.aggregators if config.algorithm == "modest" else None,
            "success_fraction": config.success_fraction if config.algorithm == "modest" else None,
            "speeds": config.speeds,
            "slow_peers": sorted(self.slow),
            "duration": config.duration,
            "faults": config.faults,
            "byzantine": config.byzantine,
            "attackers": sorted(self.attackers),
            "peers_up_at_end": len(live),
            "stalled": self.stalled,
            "stopped_at_target": self.stopped_at_target,
            "codec": gossip.codec,
            "error_feedback": gossip.error_feedback,
            "consensus_step": gossip.consensus_step,
            "device": str(self.device),
            "engine": "per-peer" if self.per_peer_reason else "batched",
            "engine_notice": self.per_peer_reason,
            "threads": self.threads,
            "mean_accuracy": _mean(accuracies),
            "mean_accuracy_slow": _mean([r.accuracy for r in final if r.peer in self.slow and r.accuracy is not None]),
            "mean_accuracy_fast": _mean([r.accuracy for r in final if r.peer not in self.slow and r.accuracy is not None]),
            "min_accuracy": min(accuracies, default=None),
            "max_accuracy": max(accuracies, default=None),
            "mean_loss": _mean([record.loss for record in final if record.loss is not None]),
            "squared_error": _mean([record.squared_error for record in final if record.squared_error is not None]),
            "consensus_distance": (
                consensus_distance([self.trainers[peer].state() for peer in live])
                if self.mixing_neighbours and live else None
            ),
            "bytes_sent_total": self.network.bytes_sent(),
            "missed_exchanges_total": self.metrics.missed_exchanges,
            "rejected_total": self.network.rejected(),
            "rollbacks_total": sum(trainer.rollbacks for trainer in self.trainers.values()),
            "virtual_seconds": virtual_seconds,
            "wall_seconds": wall_seconds,
            **time_to_target(points, config.target_accuracy, wall_clock=False),
            "consensus_by_round": [[round_, distance] for round_, distance in self.consensus.distances()],
        }
        if self.walking:
            summary.update(self._walk_summary())
        if self.asynchronous:
            summary.update(staleness=config.staleness, max_staleness=config.max_staleness)
        return summary, final

    def _walk_summary(self) -> dict[str, Any]:
        config = self.config
        copies = [0] * config.tokens
        for peer, node in self.nodes.items():
            if peer not in self.gone:
                for token in node.protocol.held():
                    copies[token] += 1
        return {
            "alpha": config.alpha,
            "srrw_a": config.srrw_a,
            "srrw_b": config.srrw_b,
            "srrw_stay": config.srrw_stay,
            "tokens": config.tokens,
            # Live copies of each token at the end: one each, unless a token was lost or duplicated.
            "token_copies": copies,
            "tokens_reissued": sum(walker.reissued for walker in self.walkers),
            "stale_tokens_dropped": sum(walker.stale_dropped for walker in self.walkers),
        }

    def _sample_size(self) -> int | None:
        if self.config.algorithm == "modest":
            return self.config.sample_size or min(10, self.config.peers)
        if self.config.algorithm == "fedavg":
            return self.config.sample_size or self.config.peers
        return None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
