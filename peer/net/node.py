"""`peer run`: one real peer. It joins (or starts) a swarm through the DHT, trains on its shard,
gossips with the neighbours that the overlay gives it (or, with MoDeST, trains and averages when
sampled), and leaves cleanly on SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import hivemind
import torch
from hivemind.dht.crypto import RSASignatureValidator

from gossip.catchup import SnapshotServer, catch_up
from gossip.learner import State
from gossip.neighbourhood import OverlayNeighbourhood
from gossip.protocols import GOSSIP_PROTOCOLS, SRRW, AsyncGossip, MoDeST, Protocol, ProtocolContext, RoundReport
from gossip.settings import GossipSettings
from gossip.transport import Clock
from gossip.view import Entry
from gossip.wire import Limits
from peer.checkpoint import Checkpoint, CheckpointError, check_fits, check_progress, read_checkpoint, write_checkpoint
from peer.config import ConfigError, RunConfig
from peer.curve import LatestAccuracies, time_to_target
from peer.metrics import MetricsLog, RoundRecord, prepare_out, write_json_atomic
from peer.net.access import access_from, load_identity, peer_id_of
from peer.net.clock import WallClock
from peer.net.live_metrics import LiveMetrics
from peer.net.membership import Membership, PeerRecord, children_ignore_ctrl_c
from peer.net.reaper import start_reaper
from peer.net.transport import P2PTransport
from peer.runtime import PeerNode
from peer.tasks import load_task, partition
from peer.trainer import Trainer, peer_trainer, resolve_device, split_optimum

log = logging.getLogger(__name__)

# Room beyond the model's own size for a message's header and a codec's side data.
PAYLOAD_SLACK_BYTES = 1 << 20
# What the p2p daemon says when none of --initial-peers answered, and how long to wait before trying again.
BOOTSTRAP_FAILED = "failed to connect to bootstrap peers"
BOOTSTRAP_RETRY_SECONDS = 1.0
# Seconds a leaving MoDeST peer spends saying goodbye (peers that already left do not answer).
GOODBYE_TIMEOUT = 5.0


def protocol_family(algorithm: str) -> str:
    """Peers of one family speak the same messages: D-PSGD and DFedSAM peers gossip together."""
    return algorithm if algorithm in ("modest", "srrw", "async-gossip") else "gossip"


def fingerprint(task_name: str, state: State, gossip: GossipSettings, algorithm: str) -> str:
    """Peers mix only with peers whose task, protocol family, model shapes and kind of exchange
    match this digest.

    Codecs may differ (a receiver decodes what the message names), but plain gossip and gossip
    with error feedback exchange different things, and a sampling peer (MoDeST) never talks to
    a gossiping one.
    """
    exchange = "plain" if gossip.error_feedback == "none" else "error-feedback"
    layout = [task_name, protocol_family(algorithm), exchange] + [
        [name, list(t.shape), str(t.dtype)] for name, t in sorted(state.items())
    ]
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]


def start_dht(config: RunConfig, identity: Path, signer: RSASignatureValidator) -> hivemind.DHT:
    """Start the DHT (and its libp2p daemon) as ``identity``, whose key ``signer`` holds; a bad
    bootstrap address, or bootstrap peers still unreachable after --join-timeout, is a ConfigError.

    Bootstrap peers are tried again until then: a peer restarted at once after a crash may find
    them still holding its previous connection, and a peer started with its swarm may come up
    before the peers it bootstraps from."""
    deadline = time.monotonic() + config.join_timeout
    warned = False
    while True:
        try:
            return hivemind.DHT(
                initial_peers=config.initial_peers,
                host_maddrs=config.host_maddrs,
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
                startup_timeout=max(1.0, deadline - time.monotonic()),
            )
        except Exception as error:
            reason = str(error).replace("\n", " ")
            if BOOTSTRAP_FAILED in reason and time.monotonic() + BOOTSTRAP_RETRY_SECONDS < deadline:
                if not warned:
                    log.warning("none of --initial-peers answered; trying again for up to %.0f s", deadline - time.monotonic())
                    warned = True
                time.sleep(BOOTSTRAP_RETRY_SECONDS)
                continue
            raise ConfigError(
                f"could not start the DHT: {reason}; --initial-peers must be multiaddrs of running peers, "
                "like /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW..."
            ) from error


async def run_peer(config: RunConfig, on_record: Callable[[RoundRecord], None] | None = None) -> dict:
    if config.out:
        prepare_out(config.out)
    resumed = read_checkpoint(config.out) if config.resume else None  # before any work, should there be none
    if resumed:
        check_progress(resumed, config.out / "metrics.jsonl", config.rounds)
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


async def _run_peer(
    config: RunConfig, resumed: Checkpoint | None, on_record: Callable[[RoundRecord], None] | None,
    live: LiveMetrics | None,
) -> dict:
    torch.set_num_threads(config.threads)
    task = load_task(config.task, config.data_dir, peers=config.shards)
    shards = partition(task.train_y, config.shards, config.partition, config.seed, owners=task.owners)
    # Every peer holds the whole task, so each can work out the optimum of the split.
    optimum = split_optimum(config, task, shards)
    trainer = peer_trainer(config, task, shards[config.shard], config.shard, resolve_device(config.device), optimum)
    state = trainer.state()
    gossip = config.gossip_settings()
    digest = fingerprint(task.name, state, gossip, config.algorithm)
    if resumed:
        resume_training(resumed, trainer, task.name, config.algorithm, digest)
        print(f"resuming from the checkpoint in {config.out}: round {resumed.round}", flush=True)
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    access = access_from(config.swarm_key, config.allow_peers)
    # A peer without --identity keeps the key it makes in --out, so that it comes back as itself
    # (--resume); without --out it gets a fresh one. Its key signs its membership record.
    scratch = None if config.identity or config.out else tempfile.TemporaryDirectory(prefix="peer-identity-")
    identity = config.identity or (config.out / "identity.key" if config.out else Path(scratch.name) / "identity.key")
    identity_lock = None if scratch else lock_identity(identity)
    signer = RSASignatureValidator(load_identity(identity))
    # The DHT process and its daemon must outlive a Ctrl-C until this peer has saved and withdrawn.
    with children_ignore_ctrl_c():
        dht = await asyncio.to_thread(start_dht, config, identity, signer)
    membership = None
    transport = None
    serving = True  # until a MoDeST peer's run is over
    keep_alive = None
    started = time.perf_counter()
    try:
        p2p = await dht.replicate_p2p()
        me = p2p.peer_id.to_base58()
        if me != peer_id_of(signer._private_key.get_public_key()):  # the validator keeps its key private
            raise ConfigError(f"the p2p daemon runs as {me}, not as identity {identity}; is the file being replaced?")
        if config.client_mode:
            addresses = []
            print(f"peer {me} in swarm {config.swarm!r}, in client mode: it dials out and accepts no connections", flush=True)
        else:
            addresses = [str(a) for a in dht.get_visible_maddrs()]
            print(f"peer {me} in swarm {config.swarm!r}; others join with --initial-peers {' '.join(addresses)}", flush=True)
        membership = Membership(
            dht, config.swarm, PeerRecord(me, addresses, digest, 0, client=config.client_mode),
            ttl=config.record_ttl, signer=signer, access=access,
        )
        transport = P2PTransport(
            p2p, Limits(max_payload_bytes=model_bytes + PAYLOAD_SLACK_BYTES), reachable=membership.view, access=access,
            addresses=membership.addresses, admits=membership.is_member, exchange_timeout=config.exchange_timeout,
        )
        if live:
            live.counters = transport.counters
            live.view_size = lambda: len(membership.live)
            live.streams_open = lambda: transport.open_streams.total
        curve = LatestAccuracies(1) if config.algorithm == "async-gossip" else None
        if resumed:
            metrics = MetricsLog.resumed(config.out / "metrics.jsonl", resumed.metrics_bytes, curve)
        else:
            metrics = MetricsLog(config.out / "metrics.jsonl" if config.out else None, curve=curve)
        clock = WallClock(config.slowdown)
        modest = config.algorithm == "modest"
        # MoDeST does not catch up (a newcomer JOINs and waits to be sampled), nor does a token walk
        # (a newcomer waits for a token), so they serve no snapshots.
        snapshots = (
            None if modest or config.algorithm == "srrw" else SnapshotServer(transport, state)
        )
        neighbourhood: OverlayNeighbourhood | None = None
        aggregated: set[int] = set()  # rounds this peer recorded (with MoDeST: the rounds it averaged)
        checkpoint_failures = 0

        def save() -> None:
            nonlocal checkpoint_failures
            tensors, meta = protocol.save_state()
            written = write_checkpoint(config.out, Checkpoint(
                current_round(), trainer.state(), trainer.training_state(), tensors, meta,
                fingerprint=digest, task=task.name, algorithm=config.algorithm, metrics_bytes=metrics.bytes_written,
            ))
            checkpoint_failures += not written

        def round_done(record: RoundRecord) -> None:
            aggregated.add(record.round)
            if config.checkpoint_every and len(aggregated) % config.checkpoint_every == 0:
                save()
            if snapshots:
                snapshots.publish(trainer.state(), record.round + 1)
            if record.accuracy is not None:
                membership.evaluated(record.accuracy)
            if live:
                # MoDeST has no neighbours: the models this aggregator averaged stand in for them.
                neighbours = (
                    len(neighbourhood.in_weights((record.round + 1) * config.gossip_steps))
                    if neighbourhood else record.neighbours_heard
                )
                live.observe(record, neighbours=neighbours, tasks=len(asyncio.all_tasks()))
            if on_record:
                on_record(record)

        node = PeerNode(
            transport, clock, trainer, metrics, rounds=config.rounds, eval_every=config.eval_every,
            on_record=round_done, pace=0.0 if modest or config.algorithm == "srrw" else config.pace, wall_time=True,
        )
        protocol: Protocol
        if modest:
            # Only aggregators finish rounds; --pace holds each aggregation back instead (see paced).
            context = ProtocolContext(transport, clock, trainer, None, paced(node.round_finished, clock, config.pace), gossip)
            # Built (and serving) before anyone can learn of us; its view is filled once the peers are known.
            protocol = MoDeST(context, local_steps=config.local_steps, settings=config.modest_settings(), peers=[])
        elif config.algorithm == "srrw":
            neighbourhood = OverlayNeighbourhood(
                config.topology, me, membership.view, weights=config.weights, seed=config.seed,
                admits=membership.compatible, unreachable=membership.suspect, clients=membership.clients,
            )
            # A peer holds a token now and then, so --pace holds back each visit, not this peer's rounds.
            context = ProtocolContext(
                transport, clock, trainer, neighbourhood, paced(node.round_finished, clock, config.pace), gossip
            )
            # Its peers (where the tokens start, and their first visit counts) are known once the swarm is.
            protocol = SRRW(
                context, local_steps=config.local_steps, settings=config.walk_settings(), peers=[], seed=config.seed
            )
        else:
            neighbourhood = OverlayNeighbourhood(
                config.topology, me, membership.view, weights=config.weights, seed=config.seed,
                admits=membership.compatible, unreachable=membership.suspect, clients=membership.clients,
            )
            context = ProtocolContext(
                transport, clock, trainer, neighbourhood, node.round_finished, gossip, deadline=config.duration
            )
            if config.algorithm == "async-gossip":
                protocol = AsyncGossip(context, local_steps=config.local_steps, adaptive=config.adaptive_steps)
            else:
                protocol = GOSSIP_PROTOCOLS[config.algorithm](
                    context, local_steps=config.local_steps, gossip_steps=config.gossip_steps,
                    mix_start=config.mix_point == "start",
                )
        node.protocol = protocol
        if resumed:
            try:
                protocol.restore_state(resumed.protocol, resumed.protocol_meta)
            except ValueError as error:
                raise CheckpointError(f"--resume: the checkpoint's {config.algorithm} state does not fit: {error}") from None
        # Handlers are in place before anyone can learn of us, so no early model is refused.
        await transport.start()
        await _wait_for_peers(membership, config)
        if isinstance(protocol, MoDeST):
            first_round = 0
            _enter_swarm(protocol, membership)
        elif isinstance(protocol, SRRW):
            first_round = 0
            protocol.peers = sorted(set(membership.view()) | {me})
            protocol.joining = any(r.round > 0 for r in membership.live.values() if r.peer_id != me)
        else:
            first_round = await _catch_up(transport, membership, trainer, config, resumed.round if resumed else 0)

        def current_round() -> int:
            recorded = metrics.latest[me].round + 1 if me in metrics.latest else first_round
            if isinstance(protocol, MoDeST):
                # Only aggregators record rounds; the view's estimate is the round the swarm is at.
                return min(max(protocol.view.estimate(), recorded), config.rounds)
            if isinstance(protocol, SRRW) and protocol.finished():
                return config.rounds  # every token made its last hop: the run is complete here too
            if isinstance(protocol, AsyncGossip):
                return min(protocol.iteration, config.rounds)  # past the iterations it jumped over
            return recorded

        keep_alive = asyncio.create_task(membership.keep_alive(current_round))
        holds_final_model = False
        try:
            await _until_signal(node.run(first_round))
            if isinstance(protocol, MoDeST):
                # The last round's model reached us (or we averaged it), unless the run ended on a
                # signal or on word from others that it was over.
                holds_final_model = protocol.finished.is_set()
                # Its handlers outlive run(): a late model must not change the one we evaluate and save.
                await _stop_serving(transport)
                serving = False
            await clock.settle()  # a training step cut short by the signal finishes before saving
            if isinstance(protocol, MoDeST):
                await _say_goodbye(protocol)
        finally:
            metrics.close()
        last = metrics.latest.get(me)
        accuracy, loss = (last.accuracy, last.loss) if last else (None, None)
        walked = isinstance(protocol, SRRW)
        if (holds_final_model or walked) and not (last and last.round == config.rounds - 1):
            # Only aggregators record rounds, and every peer was sent the last round's model; with a
            # token walk, only holders do, and each peer keeps the last token model it trained.
            accuracy, loss = await clock.compute(trainer.evaluate, steps=0)
            membership.evaluated(accuracy)  # shown by `peer status` once we have left
        summary = {
            "peer": me,
            "swarm": config.swarm,
            "algorithm": config.algorithm,
            "init": config.init,
            "mixing": config.mixing,
            "gossip_steps": config.gossip_steps,
            "task": config.task,
            "topology": "sampled" if modest else config.topology,
            "partition": config.partition,
            "shard": config.shard,
            "shards": config.shards,
            "seed": config.seed,
            "codec": gossip.codec,
            "error_feedback": gossip.error_feedback,
            "rounds_completed": current_round(),
            "rounds": config.rounds,
            "accuracy": accuracy,
            "loss": loss,
            "bytes_sent": transport.counters.bytes_sent,
            "bytes_received": transport.counters.bytes_received,
            "rejected": transport.counters.rejected,
            "rejections": dict(transport.counters.rejections),
            "missed_exchanges": metrics.missed_exchanges,
            "local_steps_total": metrics.local_steps,
            "slowdown": config.slowdown,
            "peers_seen": sorted(membership.seen),
            "private_swarm": access.private,
            "client_mode": config.client_mode,
            "failed_dials": dict(transport.failed_dials),
            "records_ignored": dict(membership.rejected),
            "rollbacks": trainer.rollbacks,
            "wall_seconds": time.perf_counter() - started,
            **time_to_target(metrics.curve.points(), config.target_accuracy, wall_clock=True),
        }
        if isinstance(protocol, MoDeST):
            summary.update(
                sample_size=protocol.settings.sample_size, aggregators=protocol.settings.aggregators,
                final_model=holds_final_model, rounds_aggregated=len(aggregated),
            )
        if walked:
            summary.update(
                alpha=config.alpha, tokens=config.tokens, hops_visited=len(aggregated), tokens_held=protocol.held(),
                tokens_reissued=protocol.reissued, squared_error=trainer.squared_error(),
            )
        if resumed:
            summary["resumed_from_round"] = resumed.round
        if config.out:
            save()
            summary["checkpoint_failures"] = checkpoint_failures
            write_json_atomic(config.out / "summary.json", summary)
        return summary
    finally:
        if keep_alive:
            keep_alive.cancel()
        await _leave(membership, transport if serving else None, dht)
        if identity_lock:
            identity_lock.close()
        if scratch:
            scratch.cleanup()


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


async def _wait_for_peers(membership: Membership, config: RunConfig) -> None:
    deadline = time.monotonic() + config.join_timeout
    while True:
        await membership.announce(0)
        live = await membership.refresh()
        if len(live) >= config.min_peers:
            return
        if time.monotonic() > deadline:
            raise ConfigError(
                f"only {len(live)} of --min-peers {config.min_peers} peers joined swarm {config.swarm!r} "
                f"within {config.join_timeout:g} s; check --initial-peers and --swarm, or raise --join-timeout"
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
    """--pace where a peer records only some rounds: a MoDeST aggregator hands a round's average on
    no sooner than ``pace`` seconds after the round's first model reached it, and the holder of a
    walking token hands it on no sooner than ``pace`` seconds after its local steps, so each round
    (each hop) takes at least that long."""
    if not pace:
        return round_finished

    async def finished(report: RoundReport) -> None:
        started = clock.now() - report.exchange_seconds
        await round_finished(report)
        await clock.sleep(started + pace - clock.now())

    return finished


def _enter_swarm(protocol: MoDeST, membership: Membership) -> None:
    """Give MoDeST the live peers as its view; in a swarm already under way it JOINs them."""
    protocol.view.merge({peer: Entry(0) for peer in membership.view()})
    me = membership.record.peer_id
    protocol.joining = any(r.round > 0 for r in membership.live.values() if r.peer_id != me)
    if protocol.joining:
        print(f"joining a swarm under way at round {max(r.round for r in membership.live.values())}", flush=True)


async def _stop_serving(transport: P2PTransport) -> None:
    """Refuse new streams: requests then fail at once, as to a peer that has gone (no reply to count)."""
    try:
        async with asyncio.timeout(5):
            await transport.stop()
    except Exception as error:  # noqa: BLE001 - the summary and the checkpoint come first
        log.warning("could not stop serving: %r", error)


async def _say_goodbye(protocol: MoDeST) -> None:
    """LEAVE to some peers, so that nobody samples us again; it also spreads word of a finished run."""
    try:
        async with asyncio.timeout(GOODBYE_TIMEOUT):
            await protocol.leave()
    except Exception as error:  # noqa: BLE001 - leaving must not cost the summary and the checkpoint
        log.warning("could not say goodbye: %r", error)


async def _until_signal(work) -> None:
    """Run ``work``; SIGINT or SIGTERM stops it at once and lets the caller save and leave."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        log.info("stopping on a signal")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
