"""`peer simulate`: many peers in one process on an emulated network and a virtual clock."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gossip.neighbourhood import GraphNeighbourhood
from gossip.protocols import Protocol, ProtocolContext
from gossip.protocols.base import COORDINATOR
from peer.config import SimulationConfig, fitted
from peer.curve import LatestAccuracies, Target, time_to_target
from peer.errors import ConfigError
from peer.flops import step_flops
from peer.metrics import ConsensusByRound, MetricsLog, RoundRecord, consensus_distance, prepare_out, write_json_atomic
from peer.runtime import PeerNode
from peer.sim import LinkModel, SimClock, SimNetwork, SpeedProfile, VirtualTimeLoop
from peer.sim.alone import REFERENCE_LABEL, LocalTraining
from peer.sim.averaging import AveragingRoom
from peer.sim.batched import CHUNK_PEERS, BatchedTraining, BatchingError, StackedTrainer, batching_refusal
from peer.sim.byzantine import Adversary, Attacker, HonestModels, choose_attackers, choose_victims, targeted_topology
from peer.sim.links import MBIT
from peer.summary import summary as common_summary
from peer.tasks import Task, load_task, partition
from peer.trainer import Trainer, evaluation_set, peer_trainer, resolve_device, split_optimum
from topology import Topology, parse_topology

log = logging.getLogger(__name__)

# From this many FLOPs per local step (forward and backward), one model's step keeps two CPU cores
# busy and trains faster one peer at a time than batched (scripts/bench_tasks.py measures both).
COMPUTE_BOUND_FLOPS = 500_000_000

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
    shards = partition(task.partition_labels(), peers or config.peers, config.partition, config.seed, owners=task.owners)
    optimum = split_optimum(config, task, shards)
    test = evaluation_set(config, task)  # one copy for every peer
    return [
        peer_trainer(config, task, shard, index, device, optimum, trainer_class, test)
        for index, shard in enumerate(shards)
    ]


def evaluation_sample(peers: list[str], wanted: int | None, seed: int) -> frozenset[str] | None:
    """The ``wanted`` of ``peers`` that --eval-peers evaluates at every evaluated round, drawn once
    from the seed, the same for the whole run; None when every peer evaluates (not given, or as
    many as there are peers or more)."""
    if wanted is None or wanted >= len(peers):
        return None
    chosen = np.random.default_rng(seed).choice(len(peers), size=wanted, replace=False)
    return frozenset(peers[int(index)] for index in chosen)


def training_engine(config: SimulationConfig, task: Task, device: torch.device, flops: int) -> str | None:
    """Why the run's peers train one by one (--engine per-peer, a model that cannot be batched, or one
    whose steps are big enough to keep every core busy alone), or None when they train as one batched
    step; --engine batched with a model it cannot run is an error."""
    if config.engine == "per-peer":
        return "--engine per-peer"
    refusal = batching_refusal(task.make_model(), task.train_x[:4])
    if refusal and config.engine == "batched":
        raise BatchingError(f"--engine batched: {refusal}; use --engine per-peer (or auto) for this model")
    if refusal:
        log.warning("each peer trains alone (slower): %s", refusal)
        return refusal
    if config.engine == "auto" and device.type == "cpu" and flops >= COMPUTE_BOUND_FLOPS:
        return (
            f"a step is {flops / 1e9:.1f} GFLOP, enough to keep every core busy one model at a time, "
            "which is faster on a CPU than batching (--engine batched to batch anyway)"
        )
    return None


def simulate(config: SimulationConfig, on_record: Callable[[RoundRecord], None] | None = None) -> SimulationResult:
    """Run a whole simulation; raises TaskError, PartitionError, TopologyError or ValueError on bad input."""
    if config.out:
        prepare_out(config.out, overwrite=config.overwrite)
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
        self.settings = fitted(config, config.peers)  # what the protocol reads: fitted to the swarm's size
        # One peer has nobody to exchange with: whatever the algorithm, it trains alone (the reference).
        self.alone = config.peers == 1
        self.protocol = LocalTraining if self.alone else config.protocol
        self.on_record = on_record
        self.faults = config.fault_events
        self.device = resolve_device(config.device)
        self.ids = peer_ids(config.peers + config.newcomers())
        self.initial, self.newcomers = self.ids[: config.peers], list(self.ids[config.peers :])
        attack = config.attack
        self.attackers = choose_attackers(attack, self.initial, config.seed) if attack else frozenset()
        # The initial honest peers that evaluate at every evaluated round (None: all); the others,
        # and the newcomers, evaluate their last round only. Attackers are never evaluated.
        self.sampled = evaluation_sample(
            [peer for peer in self.initial if peer not in self.attackers], config.eval_peers, config.seed
        )
        self.topology, self.victims = self._overlay()
        self.task = load_task(config.task, config.data_dir, peers=len(self.ids), download=config.download)
        trainers = self._trainers()
        self.trainers = dict(zip(self.ids, trainers))
        try:
            self.protocol.check_model(trainers[0].state(), config)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        # The peers whose evaluations make each evaluated round's point of the curve.
        evaluating = len(self.sampled) if self.sampled else config.peers - len(self.attackers)
        self.metrics = MetricsLog(
            config.out / "metrics.jsonl" if config.out else None,
            curve=None if self.protocol.rounds_shared else LatestAccuracies(evaluating),
        )
        self.consensus = ConsensusByRound(None if self.faults else evaluating)
        self.network = self._network()
        self.averaging = AveragingRoom(self.network, config.gossip.codec) if self.protocol.averages(self.settings) else None
        self.speeds = config.peer_speeds
        self.slow = frozenset(self.ids[i] for i in self.speeds.slow())
        # Each peer computes at its own speed; a coordinator (FedAvg's server) at --step-time.
        self.clock = SimClock(SpeedProfile(config.step_time))
        self.clocks = {COORDINATOR: self.clock} | {
            peer: SimClock(SpeedProfile(seconds, self.speeds.jitter), seed=f"{config.seed}:{peer}", engine=self.engine)
            for peer, seconds in zip(self.ids, self.speeds.step_times)
        }
        self.gossip = config.gossip
        self.nodes: dict[str, PeerNode] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.gone: set[str] = set()  # crashed or left
        self.last_round = -1  # the highest round anybody has recorded
        self.last_record_at = 0.0
        self.stalled = False
        self.stopped_at_target = False
        self._fired = 0  # faults applied so far, in round order
        self._background: set[asyncio.Task] = set()
        self.built: list[tuple[str, Protocol]] = []  # every peer's protocol, restarted peers' earlier ones included
        # A round cannot take longer than its training plus this: the stall watchdog's unit.
        self.round_timeout = config.exchange_timeout + config.local_steps * max(self.speeds.step_times)
        self.adversary = Adversary(
            attack, self.attackers, self.topology, self.ids, HonestModels(self.trainers[self.ids[0]].state()),
            live=lambda peer: peer in self.nodes and peer not in self.gone, seed=config.seed,
        ) if attack else None

    def _network(self) -> SimNetwork:
        """Each peer's uplink and downlink as --bandwidths gives them; a coordinator's at --link-bandwidth."""
        config = self.config
        link = LinkModel(config.link_latency, config.link_loss)
        network = SimNetwork(link, bandwidth=config.link_bandwidth * MBIT, seed=config.seed)
        bandwidths = config.peer_bandwidths
        for peer, up, down in zip(self.ids, bandwidths.up, bandwidths.down):
            network.set_bandwidth(peer, up * MBIT, down * MBIT)
        return network

    def _overlay(self) -> tuple[Topology | None, list[str]]:
        """The graph of the run, and the victims of targeted attackers (who then send to them only)."""
        topology, attack = self._topology(), self.config.attack
        if not (attack and attack.targeted):
            return topology, []
        victims = choose_victims(topology, self.initial, self.attackers, self.config.seed)
        index = {peer: i for i, peer in enumerate(self.ids)}
        return targeted_topology(topology, {index[p] for p in self.attackers}, {index[p] for p in victims}), victims

    def _topology(self) -> Topology | None:
        """The graph of every peer, newcomers included (they have their place on it from the start);
        None for one peer, which has no graph."""
        if self.alone:
            return None
        config = self.config
        topology = parse_topology(config.topology, len(self.ids), weights=config.weights, seed=config.seed)
        self.protocol.check_topology(topology, config)
        return topology

    def _trainers(self) -> list[Trainer]:
        """Every peer's trainer, newcomers' included, and the engine that trains them (batched or one by one)."""
        config = self.config
        self.step_flops = step_flops(self.task, config.batch_size)
        self.per_peer_reason = training_engine(config, self.task, self.device, self.step_flops)
        batched = self.per_peer_reason is None
        trainers = build_trainers(config, self.task, self.device, len(self.ids), StackedTrainer if batched else Trainer)
        # The batched engine splits the stack over the threads, each computing alone; one model trains on
        # all of them when its steps are big enough to use them, on one when they are not.
        self.threads = config.compute_threads(batched or self.step_flops >= COMPUTE_BOUND_FLOPS)
        torch.set_num_threads(1 if batched else self.threads)
        # A GPU takes the whole stack at once, from one thread.
        on_cpu = self.device.type == "cpu"
        self.engine = BatchedTraining(
            trainers, workers=self.threads if on_cpu else 1, chunk=CHUNK_PEERS if on_cpu else len(trainers)
        ) if batched else None
        return trainers

    def close(self) -> None:
        self.metrics.close()
        if self.engine:
            self.engine.close()

    def _node(self, peer_id: str, trainer: Trainer, transport, *, joining: bool) -> PeerNode:
        config = self.config
        clock = self.clocks[peer_id]
        node = PeerNode(
            transport, clock, trainer, self.metrics, rounds=config.rounds, eval_every=config.eval_every,
            on_record=self._recorded, swarm_bytes=self.network.bytes_sent, eval_rounds=self._evaluates(peer_id),
        )
        neighbourhood = self._neighbourhood(peer_id) if self.protocol.needs_neighbourhood() else None
        context = ProtocolContext(
            transport, clock, trainer, neighbourhood, node.round_finished, self.gossip, deadline=config.duration,
            averaging=self.averaging.join(peer_id) if self.averaging else None,
        )
        node.protocol = self.protocol.build(context, self.settings, peers=self.initial, joining=joining)
        self.built.append((peer_id, node.protocol))
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

    def _start_coordinator(self, coordinator: type[Protocol]) -> None:
        config = self.config
        # It holds the global model, which starts as the peers' model does with --init same.
        trainer = peer_trainer(config, self.task, np.arange(0), 0, self.device)
        transport = self.network.attach(COORDINATOR)
        node = PeerNode(
            transport, self.clock, trainer, self.metrics, rounds=config.rounds, eval_every=config.eval_every,
            on_record=self._recorded, swarm_bytes=self.network.bytes_sent,
        )
        context = ProtocolContext(transport, self.clock, trainer, None, node.round_finished, self.gossip)
        node.protocol = coordinator.build(context, self.settings, peers=self.initial, joining=False)
        self.tasks[COORDINATOR] = asyncio.get_running_loop().create_task(node.run())

    def _evaluates(self, peer: str) -> bool:
        """Whether ``peer`` evaluates at every evaluated round (else at its last only: --eval-peers)."""
        return self.sampled is None or peer in self.sampled

    def _recorded(self, record: RoundRecord) -> None:
        # Called as the peer finishes its round, before it trains again: its model is the round's.
        # The consensus of a round is the evaluated peers' (the --eval-peers sample's, at the last round too).
        if (
            self.protocol.mixes_neighbours and self.protocol.rounds_shared and record.accuracy is not None
            and self._evaluates(record.peer)
        ):
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
        target = Target.of(self.config)
        if not self.protocol.rounds_shared:
            return target.reached(self.metrics.curve.latest())
        point = self.metrics.curve.point(round_)
        # A round counts once every live peer that evaluates it has; a round's one model counts at once.
        complete = self.protocol.one_model or point.peers >= len(self._evaluating_up())
        return complete and target.reached(point)

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
        if self.protocol.coordinator:
            self._start_coordinator(self.protocol.coordinator)
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

    def _evaluating_up(self) -> list[str]:
        """The honest peers running now that evaluate at every evaluated round: those a round's
        point of the curve waits for (with --eval-peers, the sample's; else every honest peer)."""
        return [peer for peer in self._honest_up() if self._evaluates(peer)]

    def _in_degrees(self) -> dict[str, float]:
        """How many models a peer was sent per gossip step, over every peer and step of the run."""
        degrees = np.array(self.topology.in_degrees((self.last_round + 1) * self.config.gossip_steps))
        return {
            "mean": round(float(degrees.mean()), 3), "std": round(float(degrees.std()), 3),
            "min": int(degrees.min()), "max": int(degrees.max()),
        }

    def summary(self, virtual_seconds: float, wall_seconds: float) -> tuple[dict[str, Any], list[RoundRecord]]:
        config, protocol = self.config, self.protocol
        live = self._honest_up()
        if protocol.one_model:
            final = [record for record in self.metrics.latest.values() if record.round == self.last_round]
        else:
            final = [self.metrics.latest[peer] for peer in live if peer in self.metrics.latest]
        mixing = protocol.mixes_neighbours
        summary = common_summary(
            self.settings, peers=config.peers, rounds_completed=self.last_round + 1,
            accuracies=[record.accuracy for record in final if record.accuracy is not None],
            losses=[record.loss for record in final if record.loss is not None],
            bytes_sent=self.network.bytes_sent(), bytes_received=None, rejected=self.network.rejected(),
            missed_exchanges=self.metrics.missed_exchanges, local_steps=self.metrics.local_steps,
            wall_seconds=wall_seconds,
            to_target=time_to_target(self.metrics.curve.points(), Target.of(config), wall_clock=False),
            spectral_gap=self.topology.spectral_gap() if mixing else None,
        )
        summary.update(
            in_degree=self._in_degrees() if mixing and self.last_round >= 0 else None,
            batch_size=config.batch_size,
            lr=self.trainers[self.ids[0]].lr,
            speeds=config.speeds,
            bandwidths=config.bandwidths,
            averaged_bytes_peak=self.averaging.peak_bytes if self.averaging else None,
            slow_peers=sorted(self.slow),
            faults=config.faults,
            byzantine=config.byzantine,
            attackers=sorted(self.attackers),
            **self._victims_figures(final),
            peers_up_at_end=len(live),
            stalled=self.stalled,
            stopped_at_target=self.stopped_at_target,
            consensus_step=self.gossip.consensus_step,
            device=str(self.device),
            engine="per-peer" if self.per_peer_reason else "batched",
            engine_notice=self.per_peer_reason,
            threads=self.threads,
            optimizer=self.trainers[self.ids[0]].optimizer_kind,
            flops_per_step=self.step_flops,
            peer_steps=sum(trainer.steps_taken for trainer in self.trainers.values()),
            mean_accuracy_slow=_mean([r.accuracy for r in final if r.peer in self.slow and r.accuracy is not None]),
            mean_accuracy_fast=_mean([r.accuracy for r in final if r.peer not in self.slow and r.accuracy is not None]),
            squared_error=_mean([record.squared_error for record in final if record.squared_error is not None]),
            consensus_distance=(
                consensus_distance([self.trainers[peer].state() for peer in live]) if mixing and live else None
            ),
            virtual_seconds=virtual_seconds,
            consensus_by_round=[[round_, distance] for round_, distance in self.consensus.distances()],
            # What the curve was measured on: how many peers evaluated each round, on how many test samples.
            eval_peers=min(config.eval_peers, config.peers - len(self.attackers)) if config.eval_peers is not None else None,
            eval_samples=min(config.eval_samples, len(self.task.test_y)) if config.eval_samples is not None else None,
            reference=self.alone,
            **self._protocol_figures(),
        )
        if self.alone:
            # The algorithm did not run: the table says what did, and there was no graph.
            summary.update(label=REFERENCE_LABEL, topology="none")
        return summary, final

    def _victims_figures(self, final: list[RoundRecord]) -> dict[str, Any]:
        """Targeted attackers' victims, and their final mean accuracy beside the other honest peers'."""
        victims = self.victims
        return {
            "victims": victims,
            "mean_accuracy_victims": _mean([r.accuracy for r in final if r.peer in victims and r.accuracy is not None]),
            "mean_accuracy_spared": _mean([
                r.accuracy for r in final if victims and r.peer not in victims and r.accuracy is not None
            ]),
        }

    def _protocol_figures(self) -> dict[str, Any]:
        """The algorithm's own figures; with one peer, its keys with no value, as it did not run."""
        if self.alone:
            return dict.fromkeys(self.config.protocol.combine([], self.settings))
        return self.protocol.combine(self._figures(), self.settings)

    def _figures(self) -> list[dict[str, Any]]:
        """Every protocol's figures; ``up``: its peer runs it still at the end."""
        return [
            {
                **built.figures(), "final_model": built.holds_final_model(),
                "up": peer not in self.gone and self.nodes[peer].protocol is built,
            }
            for peer, built in self.built
        ]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
