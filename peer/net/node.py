"""`peer run`: one real peer. It joins (or starts) a swarm through the DHT, trains on its shard,
runs its protocol with the peers that the swarm's records name, and leaves cleanly on SIGINT or
SIGTERM.

A run is a sequence of small steps, none of which asks which protocol it runs:
``prepare_training`` (task, shard, trainer, resume), ``start_node`` (identity, DHT, signed
record, streams), then ``PeerRun``: ``enter`` (serve, wait for --min-peers, catch up or hand the
protocol the swarm), ``train`` (until the end or a signal, then the protocol's goodbye) and
``finish`` (final evaluation, summary, checkpoint).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hivemind
import torch
from hivemind.dht.crypto import RSASignatureValidator

from gossip.catchup import SnapshotServer, catch_up
from gossip.learner import State
from gossip.neighbourhood import OverlayNeighbourhood
from gossip.outer import floating
from gossip.protocols import ProtocolContext, RoundReport, build_protocol, protocol_named
from gossip.settings import GossipSettings
from gossip.transport import Clock
from gossip.wire import Limits
from peer.checkpoint import Checkpoint, CheckpointError, check_fits, check_progress, read_checkpoint, write_checkpoint
from peer.config import BOOTSTRAP_ENV, RunConfig
from peer.curve import LatestAccuracies, Target, time_to_target
from peer.errors import ConfigError
from peer.metrics import MetricsLog, RoundRecord, prepare_out, write_json_atomic
from peer.net.access import Access, access_from, load_identity, peer_id_of
from peer.net.averaging import HivemindAveraging, all_reduce_compression, group_prefix
from peer.net.clock import WallClock
from peer.net.dialback import DialBackService
from peer.net.live_metrics import LiveMetrics
from peer.net.membership import Membership, PeerRecord, children_ignore_ctrl_c
from peer.net.ports import listen_problem
from peer.net.reaper import start_reaper
from peer.net.transport import REACH_TIMEOUT, P2PTransport
from peer.runtime import PeerNode
from peer.summary import summary as common_summary
from peer.tasks import Task, load_task, partition
from peer.trainer import Trainer, peer_trainer, resolve_device, split_optimum

log = logging.getLogger(__name__)

# Room beyond the model's own size for a message's header and a codec's side data.
PAYLOAD_SLACK_BYTES = 1 << 20
# What the p2p daemon says when none of --initial-peers answered, and how long to wait before trying again.
BOOTSTRAP_FAILED = "failed to connect to bootstrap peers"
BOOTSTRAP_RETRY_SECONDS = 1.0
ATTEMPT_SECONDS = 20.0  # the longest one try to start the DHT may take
READY_GRACE_SECONDS = 5.0  # beyond a try's own deadline, for its process to say how it went
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def fingerprint(task_name: str, state: State, gossip: GossipSettings, algorithm: str) -> str:
    """Peers mix only with peers whose task, protocol family, model shapes and kind of exchange
    match this digest.

    Codecs may differ (a receiver decodes what the message names), but plain gossip and gossip
    with error feedback exchange different things, and peers of different protocol families
    (a sampling peer and a gossiping one) never talk.
    """
    exchange = "plain" if gossip.error_feedback == "none" else "error-feedback"
    layout = [task_name, protocol_named(algorithm).family_name(), exchange] + [
        [name, list(t.shape), str(t.dtype)] for name, t in sorted(state.items())
    ]
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]


async def start_dht(config: RunConfig, identity: Path, signer: RSASignatureValidator) -> hivemind.DHT:
    """Start the DHT (and its libp2p daemon) as ``identity``, whose key ``signer`` holds; a bad
    bootstrap address, or bootstrap peers still unreachable after --join-timeout, is a ConfigError.

    Bootstrap peers are tried again until then: a peer restarted at once after a crash may find
    them still holding its previous connection, and a peer started with its swarm may come up
    before the peers it bootstraps from. A signal ends the tries at once: the peer ignores Ctrl-C
    only while it starts the DHT's process (which inherits that, see children_ignore_ctrl_c), not
    while it waits for it."""
    deadline = time.monotonic() + config.join_timeout
    warned = False
    while True:
        timeout = max(1.0, min(deadline - time.monotonic(), ATTEMPT_SECONDS))
        with children_ignore_ctrl_c():
            dht = _dht(config, identity, signer, timeout)
        try:
            await asyncio.to_thread(dht.wait_until_ready, timeout + READY_GRACE_SECONDS)
            return dht
        except BaseException as error:
            if dht.is_alive():
                dht.shutdown()
            if not isinstance(error, Exception):
                raise
            reason = str(error).replace("\n", " ") or f"the DHT did not start within {timeout:.0f} s"
            if BOOTSTRAP_FAILED in reason and time.monotonic() + BOOTSTRAP_RETRY_SECONDS < deadline:
                if not warned:
                    log.warning("none of --initial-peers answered; trying again for up to %.0f s", deadline - time.monotonic())
                    warned = True
                await asyncio.sleep(BOOTSTRAP_RETRY_SECONDS)
                continue
            raise ConfigError(f"could not start the DHT: {reason}; {_start_hint(reason, config)}") from error


def _dht(config: RunConfig, identity: Path, signer: RSASignatureValidator, timeout: float) -> hivemind.DHT:
    """The DHT's process, started; whether it joined is told by its wait_until_ready."""
    return hivemind.DHT(
        initial_peers=config.bootstrap_peers,
        host_maddrs=config.listen_maddrs,
        announce_maddrs=config.announce_maddrs or None,
        identity_path=str(identity),
        # A key made for this run cannot be in use elsewhere: no need for hivemind's check,
        # which starts a second daemon and dials the bootstrap peers with it.
        check_if_identity_free=config.identity is not None,
        record_validators=[signer],
        # In client mode the daemon listens nowhere: the peer can only dial out, as behind a NAT.
        client_mode=config.client_mode,
        no_listen=config.client_mode,
        use_relay=config.use_relay,
        use_auto_relay=config.use_auto_relay,
        start=True,
        await_ready=False,
        startup_timeout=timeout,
    )


def _start_hint(reason: str, config: RunConfig) -> str:
    if BOOTSTRAP_FAILED in reason:
        return (
            f"none of the {len(config.bootstrap_peers)} bootstrap peers (--initial-peers, --initial-peers-file, "
            f"{BOOTSTRAP_ENV}) answered within --join-timeout "
            f"{config.join_timeout:g} s: check that they run and that their port is open; give them as each prints "
            "its own, like /ip4/203.0.113.5/tcp/31337/p2p/QmPeerId... (`peer doctor` with the same flags checks a setup)"
        )
    return "check --host, --port (or --host-maddrs) and --initial-peers; `peer doctor` with the same flags checks a setup"


async def run_peer(config: RunConfig, on_record: Callable[[RoundRecord], None] | None = None) -> dict:
    access_from(config.swarm_key, config.allow_peers)  # a bad key file is an error before anything starts
    if config.protocol.averages(config):
        all_reduce_compression(config.gossip.codec.spec)  # so is a codec that its all-reduce cannot carry
    if config.out:
        prepare_out(config.out, resume=config.resume, overwrite=config.overwrite)
    resumed = read_checkpoint(config.out) if config.resume else None  # before any work, should there be none
    if resumed:
        check_progress(resumed, config.out / "metrics.jsonl", config.rounds, ordered=not config.protocol.one_model)
    if not config.client_mode and (problem := listen_problem(config.listen_maddrs)):
        raise ConfigError(f"{problem}; stop that process, or give another --port (0: any free port) or --host")
    start_reaper()  # the DHT process and its daemon die with this process, even when it is killed outright
    live = None
    if config.metrics_port is not None:
        live = LiveMetrics({"swarm": config.swarm, "algorithm": config.algorithm, "task": config.task})
        live.serve(config.metrics_host, config.metrics_port)
        print(f"metrics at http://{config.metrics_host}:{config.metrics_port}/metrics", flush=True)
    try:
        return await _run_peer(config, resumed, on_record, live)
    finally:
        if live:
            live.stop()


@dataclass
class Training:
    """What a peer trains: its task, its trainer on its shard, and the digest of what it exchanges."""

    task: Task
    trainer: Trainer
    digest: str
    model_bytes: int


@dataclass
class Node:
    """A peer on the network: its DHT and daemon, its signed record, its streams."""

    dht: hivemind.DHT
    me: str
    membership: Membership
    transport: P2PTransport
    access: Access
    identity_lock: Any = None
    scratch: tempfile.TemporaryDirectory | None = None
    serving: bool = True
    averaging: HivemindAveraging | None = None  # its averaging in groups, where the protocol averages


def prepare_training(config: RunConfig, resumed: Checkpoint | None) -> Training:
    torch.set_num_threads(config.threads)
    task = load_task(config.task, config.data_dir, peers=config.shards, download=config.download)
    shards = partition(task.partition_labels(), config.shards, config.partition, config.seed, owners=task.owners)
    # Every peer holds the whole task, so each can work out the optimum of the split.
    optimum = split_optimum(config, task, shards)
    trainer = peer_trainer(config, task, shards[config.shard], config.shard, resolve_device(config.device), optimum)
    state = trainer.state()
    digest = fingerprint(task.name, state, config.gossip, config.algorithm)
    if resumed:
        resume_training(resumed, trainer, task.name, config.algorithm, digest)
        print(f"resuming from the checkpoint in {config.out}: round {resumed.round}", flush=True)
    return Training(task, trainer, digest, sum(t.numel() * t.element_size() for t in state.values()))


async def start_node(config: RunConfig, training: Training, live: LiveMetrics | None) -> Node:
    """Start the DHT as this peer's identity, announce its signed record and open its streams."""
    access = access_from(config.swarm_key, config.allow_peers)
    # A peer without --identity keeps the key it makes in --out, so that it comes back as itself
    # (--resume); without --out it gets a fresh one. Its key signs its membership record.
    scratch = None if config.identity or config.out else tempfile.TemporaryDirectory(prefix="peer-identity-")
    identity = config.identity or (config.out / "identity.key" if config.out else Path(scratch.name) / "identity.key")
    identity_lock = None if scratch else lock_identity(identity)
    signer = RSASignatureValidator(load_identity(identity))
    dht = await start_dht(config, identity, signer)
    try:
        p2p = await dht.replicate_p2p()
        me = p2p.peer_id.to_base58()
        if me != peer_id_of(signer._private_key.get_public_key()):  # the validator keeps its key private
            raise ConfigError(f"the p2p daemon runs as {me}, not as identity {identity}; is the file being replaced?")
        addresses = _announce(config, dht, me)
        if not config.client_mode:  # `peer doctor` asks peers to dial it back; nobody can dial a client
            await DialBackService(p2p, access).start()
        membership = Membership(
            dht, config.swarm, PeerRecord(me, addresses, training.digest, 0, client=config.client_mode),
            ttl=config.record_ttl, signer=signer, access=access,
        )
        transport = P2PTransport(
            p2p, Limits(max_payload_bytes=training.model_bytes + PAYLOAD_SLACK_BYTES), reachable=membership.view,
            access=access, addresses=membership.addresses, admits=membership.is_member,
            exchange_timeout=config.exchange_timeout,
        )
    except BaseException:
        dht.shutdown()
        raise
    if live:
        live.counters = transport.counters
        live.view_size = lambda: len(membership.live)
        live.streams_open = lambda: transport.open_streams.total
    return Node(dht, me, membership, transport, access, identity_lock, scratch)


def _announce(config: RunConfig, dht: hivemind.DHT, me: str) -> list[str]:
    """The addresses others dial this peer at (none in client mode), as the peer prints them."""
    if config.client_mode:
        print(f"peer {me} in swarm {config.swarm!r}, in client mode: it dials out and accepts no connections", flush=True)
        return []
    addresses = config.announced([str(a) for a in dht.get_visible_maddrs()])
    print(f"peer {me} in swarm {config.swarm!r}; others join with --initial-peers {' '.join(addresses)}", flush=True)
    return addresses


async def _run_peer(
    config: RunConfig, resumed: Checkpoint | None, on_record: Callable[[RoundRecord], None] | None,
    live: LiveMetrics | None,
) -> dict:
    training = prepare_training(config, resumed)
    node = await start_node(config, training, live)
    keep_alive = None
    try:
        run = PeerRun(config, training, node, resumed, on_record, live)
        first_round = await run.enter()
        keep_alive = asyncio.create_task(node.membership.keep_alive(run.current_round))
        holds_final_model = await run.train(first_round)
        return await run.finish(holds_final_model)
    finally:
        if keep_alive:
            keep_alive.cancel()
        if node.averaging:
            node.averaging.close()  # before the DHT, whose daemon it talks through
        await _leave(node.membership, node.transport if node.serving else None, node.dht)
        if node.identity_lock:
            node.identity_lock.close()
        if node.scratch:
            node.scratch.cleanup()


class PeerRun:
    """One run of a real peer, from entering the swarm to its summary and checkpoint."""

    def __init__(
        self, config: RunConfig, training: Training, node: Node, resumed: Checkpoint | None,
        on_record: Callable[[RoundRecord], None] | None, live: LiveMetrics | None,
    ):
        self.config, self.training, self.node, self.resumed = config, training, node, resumed
        self.on_record, self.live = on_record, live
        self.started = time.perf_counter()
        self.first_round = 0
        self.recorded: set[int] = set()  # rounds this peer recorded
        self.checkpoint_failures = 0
        protocol = config.protocol
        curve = None if protocol.rounds_shared else LatestAccuracies(1)
        if resumed:
            self.metrics = MetricsLog.resumed(config.out / "metrics.jsonl", resumed.metrics_bytes, curve)
        else:
            self.metrics = MetricsLog(config.out / "metrics.jsonl" if config.out else None, curve=curve)
        self.clock = WallClock(config.slowdown)
        trainer, transport = training.trainer, node.transport
        # A protocol that does not catch up serves no snapshots (its newcomers enter otherwise).
        self.snapshots = SnapshotServer(transport, trainer.state()) if protocol.catches_up else None
        self.neighbourhood = OverlayNeighbourhood(
            config.topology, node.me, node.membership.view, weights=config.weights, seed=config.seed,
            admits=node.membership.compatible, unreachable=node.membership.suspect, clients=node.membership.clients,
        ) if protocol.needs_neighbourhood() else None
        # Where a round ends in one model, --pace holds back each aggregation or visit (see paced).
        self.peer_node = PeerNode(
            transport, self.clock, trainer, self.metrics, rounds=config.rounds, eval_every=config.eval_every,
            on_record=self._round_done, pace=0.0 if protocol.one_model else config.pace, wall_time=True,
        )
        finished = paced(self.peer_node.round_finished, self.clock, config.pace if protocol.one_model else 0.0)
        if protocol.averages(config):
            # Integers (counters) are not averaged: the all-reduce carries floats, and a mean of counters is none.
            node.averaging = start_averaging(config, node, floating(trainer.state()))
        context = ProtocolContext(
            transport, self.clock, trainer, self.neighbourhood, finished, config.gossip, deadline=config.duration,
            averaging=node.averaging,
        )
        try:
            config.protocol.check_model(trainer.state(), config)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        # Built (and serving) before anyone can learn of us; it learns the swarm in enter().
        self.protocol = self.peer_node.protocol = build_protocol(config.algorithm, context, config)
        if resumed:
            try:
                self.protocol.restore_state(resumed.protocol, resumed.protocol_meta)
            except ValueError as error:
                raise CheckpointError(f"--resume: the checkpoint's {config.algorithm} state does not fit: {error}") from None

    async def enter(self) -> int:
        """Serve, wait for --min-peers, and take the swarm's round: the first round to run."""
        # Handlers are in place before anyone can learn of us, so no early model is refused.
        membership = self.node.membership
        await self.node.transport.start()
        await _wait_for_peers(membership, self.config, self.node.transport)
        own = self.resumed.round if self.resumed else 0
        if self.protocol.catches_up:
            self.first_round = await _catch_up(self.node.transport, membership, self.training.trainer, self.config, own)
            return self.first_round
        others = [r for r in membership.live.values() if r.peer_id != self.node.me]
        swarm_round = max((r.round for r in others), default=0)
        if swarm_round > 0:
            print(f"joining a swarm under way at round {swarm_round}", flush=True)
        self.protocol.enter(sorted(membership.view()), swarm_round)
        self.first_round = own
        return own

    async def train(self, first_round: int) -> bool:
        """Run until the end or a signal; whether this peer holds the run's final model."""
        try:
            await _until_signal(self.peer_node.run(first_round))
            holds_final_model = self.protocol.holds_final_model()
            if self.protocol.stops_serving:
                await _stop_serving(self.node.transport)
                self.node.serving = False
            await self.clock.settle()  # a training step cut short by the signal finishes before saving
            await self.protocol.finish()
        finally:
            self.metrics.close()
        return holds_final_model

    def current_round(self) -> int:
        me, latest = self.node.me, self.metrics.latest
        recorded = latest[me].round + 1 if me in latest else self.first_round
        return self.protocol.position(recorded, self.config.rounds)

    def _round_done(self, record: RoundRecord) -> None:
        self.recorded.add(record.round)
        if self.config.checkpoint_every and len(self.recorded) % self.config.checkpoint_every == 0:
            self.save()
        if self.snapshots:
            self.snapshots.publish(self.training.trainer.state(), record.round + 1)
        if record.accuracy is not None:
            self.node.membership.evaluated(record.accuracy, record.loss)
        if self.live:
            # Without neighbours, the models this peer mixed stand in for them.
            neighbours = (
                len(self.neighbourhood.in_weights((record.round + 1) * self.config.gossip_steps))
                if self.neighbourhood else record.neighbours_heard
            )
            self.live.observe(record, neighbours=neighbours, tasks=len(asyncio.all_tasks()))
        if self.on_record:
            self.on_record(record)

    def save(self) -> None:
        tensors, meta = self.protocol.save_state()
        training = self.training
        written = write_checkpoint(self.config.out, Checkpoint(
            self.current_round(), training.trainer.state(), training.trainer.training_state(), tensors, meta,
            fingerprint=training.digest, task=training.task.name, algorithm=self.config.algorithm,
            metrics_bytes=self.metrics.bytes_written,
        ))
        self.checkpoint_failures += not written

    async def finish(self, holds_final_model: bool) -> dict:
        """Evaluate the final model where the peer holds one it did not record, then write the
        summary and the checkpoint."""
        config, trainer = self.config, self.training.trainer
        last = self.metrics.latest.get(self.node.me)
        accuracy, loss = (last.accuracy, last.loss) if last else (None, None)
        if holds_final_model and not (last and last.round == config.rounds - 1):
            accuracy, loss = await self.clock.compute(trainer.evaluate, steps=0)
            self.node.membership.evaluated(accuracy, loss)  # shown by `peer status` once we have left
        summary = self.summary(accuracy, loss, holds_final_model)
        if config.out:
            self.save()
            summary["checkpoint_failures"] = self.checkpoint_failures
            write_json_atomic(config.out / "summary.json", summary)
        return summary

    def summary(self, accuracy: float | None, loss: float | None, holds_final_model: bool) -> dict:
        config, node, counters = self.config, self.node, self.node.transport.counters
        summary = common_summary(
            config, peers=1, rounds_completed=self.current_round(), accuracies=[accuracy] if accuracy is not None else [],
            losses=[loss] if loss is not None else [], bytes_sent=counters.bytes_sent,
            bytes_received=counters.bytes_received, rejected=counters.rejected,
            missed_exchanges=self.metrics.missed_exchanges, local_steps=self.metrics.local_steps,
            wall_seconds=time.perf_counter() - self.started,
            to_target=time_to_target(self.metrics.curve.points(), Target.of(config), wall_clock=True),
        )
        summary.update(
            peer=node.me, swarm=config.swarm, shard=config.shard, shards=config.shards,
            rounds_recorded=len(self.recorded), final_model=holds_final_model,
            rejections=dict(counters.rejections), slowdown=config.slowdown, peers_seen=sorted(node.membership.seen),
            private_swarm=node.access.private, client_mode=config.client_mode,
            failed_dials=dict(node.transport.failed_dials), broken_streams=node.transport.broken_streams,
            records_ignored=dict(node.membership.rejected),
            rollbacks=self.training.trainer.rollbacks, squared_error=self.training.trainer.squared_error(),
            optimizer=self.training.trainer.optimizer_kind, eval_samples=config.eval_samples,
            **self.protocol.figures(),
        )
        if self.resumed:
            summary["resumed_from_round"] = self.resumed.round
        return summary


def start_averaging(config: RunConfig, node: Node, reference: State) -> HivemindAveraging:
    """The peer's averaging in groups: hivemind's all-reduce with the peers of its swarm and
    fingerprint (whose records key is secret in a private swarm), each group's members checked
    against the swarm's records as the transport checks a stream's peer."""
    membership = node.membership
    return HivemindAveraging(
        node.dht, group_prefix(membership.key, membership.record.fingerprint), reference, membership.is_member,
        client_mode=config.client_mode, compression=all_reduce_compression(config.gossip.codec.spec),
        counters=node.transport.counters, allreduce_timeout=config.gossip.timeout,  # no longer than an exchange
    )


async def _leave(membership: Membership | None, transport: P2PTransport | None, dht: hivemind.DHT) -> None:
    """Withdraw, stop serving and stop the DHT; each step is tried even if one before it failed."""
    steps = []
    if membership:
        steps.append(("withdraw from the swarm", membership.withdraw()))
    if transport:
        steps.append(("stop serving", transport.stop()))
    for what, step in steps:
        try:
            async with asyncio.timeout(5):
                await step
        except Exception as error:  # noqa: BLE001 - the next step is tried all the same
            log.warning("could not %s: %r", what, error)
    dht.shutdown()


def resume_training(checkpoint: Checkpoint, trainer: Trainer, task_name: str, algorithm: str, digest: str) -> None:
    """Load ``checkpoint`` into ``trainer``; CheckpointError, with nothing loaded, when it is another
    run's or its model is far from any that training reaches from the trainer's fresh one. The
    protocol's part is loaded once the protocol exists."""
    check_fits(checkpoint, fingerprint=digest, task=task_name, algorithm=algorithm, model=trainer.state())
    try:
        trainer.load_training_state(checkpoint.training)
    except ValueError as error:
        raise CheckpointError(f"--resume: the checkpoint's training state does not fit: {error}") from None
    trainer.load_state(checkpoint.model)


def lock_identity(path: Path):
    """Hold an exclusive lock beside the identity file for as long as this peer runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path.with_name(path.name + ".lock"), "w")  # noqa: SIM115 - held open while the peer runs
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ConfigError(
            f"identity {path} is in use by a running peer; give this peer another --identity (or another --out)"
        ) from None
    return lock


async def _wait_for_peers(membership: Membership, config: RunConfig, transport: P2PTransport) -> None:
    """Until --min-peers peers (this one included) have joined and this peer has reached them: a
    stream between the two was answered (``P2PTransport.reach``), which also shows that the other
    has read this peer's record (it answers members only), so each is in the other's view from
    the start. A peer reached that has finished and left since still counts. A peer in client mode
    accepts no streams: it counts once it has reached this one, and two of them never need to
    (they are never neighbours)."""
    deadline = time.monotonic() + config.join_timeout
    me = membership.record.peer_id

    def counted(joined: set[str], clients: set[str]) -> int:
        """This peer, and those of ``joined`` it has reached (or that need not be, see above)."""
        return 1 + sum(peer in transport.reached or (config.client_mode and peer in clients) for peer in joined)

    while True:
        await membership.announce(0)
        await membership.refresh()
        joined, clients = membership.joined() - {me}, membership.clients()
        unreached = sorted(peer for peer in membership.live if peer not in transport.reached | clients | {me})
        remaining = deadline - time.monotonic()
        if counted(joined, clients) < config.min_peers and unreached and remaining > 0:
            timeout = min(REACH_TIMEOUT, max(remaining, 1.0))
            await asyncio.gather(*(transport.reach(peer, timeout=timeout) for peer in unreached))
        if counted(joined, clients) >= config.min_peers:
            return
        if time.monotonic() > deadline:
            raise ConfigError(
                f"only {counted(joined, clients)} of --min-peers {config.min_peers} peers of swarm {config.swarm!r} are "
                f"reachable within {config.join_timeout:g} s ({1 + len(joined)} joined, this one included); check "
                "--initial-peers, --swarm and that the peers' addresses can be dialled, or raise --join-timeout"
            )
        await asyncio.sleep(0.5)


async def _catch_up(
    transport: P2PTransport, membership: Membership, trainer: Trainer, config: RunConfig, own_round: int
) -> int:
    """Start from the most advanced live peer's model and round, if the swarm is past ``own_round``
    (0, or the round of the checkpoint this peer resumed from)."""
    ahead = sorted(
        (r for r in membership.live.values() if r.peer_id != transport.peer_id and r.round > own_round and not r.client),
        key=lambda r: -r.round,
    )
    if not ahead:
        return own_round
    pulled = await catch_up(transport, [r.peer_id for r in ahead], trainer.state(), timeout=config.exchange_timeout)
    if pulled is None or pulled[1] <= own_round:
        log.warning("no peer answered the catch-up pull with a newer model; starting from round %d", own_round)
        return own_round
    state, round_ = pulled
    trainer.load_state(state)
    trainer.set_progress(min(round_, config.rounds) * config.local_steps)  # join the swarm's learning-rate schedule
    print(f"caught up: round {round_} from the swarm", flush=True)
    return min(round_, config.rounds)


def paced(round_finished: Callable[[RoundReport], Awaitable[None]], clock: Clock, pace: float):
    """--pace where a round ends in one model that one peer holds: the peer that finishes a round
    (an aggregator, a token's holder) hands it on no sooner than ``pace`` seconds after the round's
    exchange began, so each round (each hop) takes at least that long."""
    if not pace:
        return round_finished

    async def finished(report: RoundReport) -> None:
        started = clock.now() - report.exchange_seconds
        await round_finished(report)
        await clock.sleep(started + pace - clock.now())

    return finished


async def _stop_serving(transport: P2PTransport) -> None:
    """Refuse new streams: requests then fail at once, as to a peer that has gone (no reply to count)."""
    try:
        async with asyncio.timeout(5):
            await transport.stop()
    except Exception as error:  # noqa: BLE001 - the summary and the checkpoint come first
        log.warning("could not stop serving: %r", error)


async def _until_signal(work) -> None:
    """Run ``work``; SIGINT or SIGTERM stops it at once and lets the caller save and leave.

    From then on, another signal only says that the peer is stopping: a second Ctrl-C must not
    cut the summary and the checkpoint short (the caller ignores signals once the loop is over)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        log.info("stopping on a signal")
    finally:
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, _still_stopping)


def _still_stopping() -> None:
    print("peer run: stopping: writing the summary and the checkpoint, then leaving the swarm", file=sys.stderr, flush=True)

