"""MoDeST: decentralised sampling (docs/algorithms.md#modest; de Vos et al., arXiv 2302.13837).

Each round a sample of s peers trains and a aggregators average, as in federated learning, but
no server chooses them: every peer orders the candidates of its view by md5(peer, round) and
takes the first ones that answer a ping (``gossip.sampling``). Round r at message level:

- A trainer of round r holds the aggregated model of round r - 1 (round 0: its initial model),
  takes its local steps, and sends the result to the first a live aggregators in round r's
  order, each of which acknowledges it on receipt.
- An aggregator averages once it holds floor(s * success_fraction) models, or when the
  aggregation timeout has passed with at least ``min_models``. It then sends the average to the
  s live trainers of round r + 1 and tells its contributors the round is done.

Views (``gossip.view``) travel with every message. What the authors' code lacked, and this has:
a trainer that gets no acknowledgement, or no word that its round was done, forwards its model
to the next live aggregator in the order; the aggregator of round r restarts round r + 1 when
nobody reports it done; failed pings are remembered. The aggregator of the last round sends the
final model to every peer it knows, and marks the run finished in its view, which the others'
heartbeats pick up.

What a peer believes, since any member may lie:
- Rounds: a claim may move our estimate ``max_round_lead`` rounds at once and then no faster than
  ``max_round_rate`` rounds a second (``gossip.view.RoundAllowance``); a message past that is
  refused. A newcomer starts from the median of what the peers it JOINs report.
- The end of the run: a round at or past the last counts only from a peer that could have
  aggregated the last round (among the first ``aggregators + sample_size`` of that round's order)
  speaking of itself; anybody else's word moves us to the last round at most. A peer stuck there
  with nothing left to restart stops. The same holds for word that a round was done.
- Models: an aggregated model, the final one included, passes the outlier guard and the mixing
  rule before it is trained on or kept (``gossip.robust``), like every model averaged here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from gossip.codecs import Identity
from gossip.conversation import Conversation
from gossip.exchange import message_seed
from gossip.learner import State
from gossip.message import Message, PeerId
from gossip.model_codec import ModelMessages, exchanged
from gossip.protocols.base import ROUNDS_OF_THE_SWARM, Protocol, ProtocolContext, RoundReport, Settings
from gossip.robust import mix_screened, screen
from gossip.sampling import Liveness, hash_order
from gossip.validation import InvalidState
from gossip.view import VIEW_TENSOR, Entry, RoundAllowance, View, ViewError, decode_view

log = logging.getLogger(__name__)

PING, PONG = "modest-ping", "modest-pong"
MODEL = "modest-model"  # an aggregated model, to a trainer of the next round
TRAINED = "modest-trained"  # a trained model, to an aggregator; answered with ACK
ACK = "modest-ack"
DONE = "modest-done"  # to contributors: the round was aggregated and handed on
JOIN, LEAVE = "modest-join", "modest-leave"
# Rounds in a view read back from our own checkpoint are not bounded by anybody's estimate.
MAX_CHECKPOINT_ROUND = 1 << 40
MAX_OPEN_ROUNDS = 8  # rounds an aggregator collects models for at once


@dataclass(frozen=True)
class ModestSettings:
    sample_size: int = 10
    aggregators: int = 1
    success_fraction: float = 1.0
    min_models: int = 1  # the fewest models an aggregator averages once its timeout has passed
    ping_timeout: float = 5.0  # also the wait for an acknowledgement
    aggregation_timeout: float = 30.0
    round_timeout: float = 120.0  # without word that a round was done, a trainer forwards and the previous aggregator restarts it
    heartbeat: float = 10.0  # a peer that heard nothing for this long pings someone, keeping both views fresh
    inactivity_rounds: int = 500  # peers not seen active for this many rounds are not sampled
    max_round_lead: int = 100  # rounds others' claims may move our estimate at once
    max_round_rate: float = 1000.0  # rounds a second they may move it after that: faster than an honest swarm goes
    join_fanout: int = 10  # a JOIN or LEAVE goes to this many times s peers of the view

    def __post_init__(self) -> None:
        if self.sample_size < 1:
            raise ValueError(f"sample size must be at least 1, got {self.sample_size}")
        if not 1 <= self.aggregators <= self.sample_size:
            raise ValueError(f"aggregators must be between 1 and the sample size {self.sample_size}, got {self.aggregators}")
        if not 0 < self.success_fraction <= 1:
            raise ValueError(f"success fraction must be in (0, 1], got {self.success_fraction}")
        if self.min_models < 1:
            raise ValueError(f"min models must be at least 1, got {self.min_models}")
        if not self.max_round_rate > 0:
            raise ValueError(f"max round rate must be > 0 rounds a second, got {self.max_round_rate}")

    @property
    def models_needed(self) -> int:
        return max(1, math.floor(self.sample_size * self.success_fraction))


@dataclass
class _Collecting:
    """An aggregator's models for one round: one per sender."""

    models: dict[PeerId, tuple[State, float, PeerId]]  # sender: (state, training loss, who sent it the model)
    started: float
    timed_out: bool = False


DEFAULT_SAMPLE_SIZE = 10
# Seconds a leaving peer spends saying goodbye at the end of a real run (peers that left do not answer).
GOODBYE_TIMEOUT = 5.0


class MoDeST(Protocol):
    name = "modest"
    label = "MoDeST (decentralised sampling)"
    own_settings = {
        "sample_size": (int | None, Field(
            None, ge=1,
            description="modest: peers that train each round (default 10); fedavg: peers the server samples (default: all)",
        )),
        "aggregators": (int, Field(1, ge=1, description="modest: peers that average each round's models")),
        "success_fraction": (float, Field(
            1.0, gt=0, le=1, description="modest: an aggregator averages once it holds this fraction of the sample's models"
        )),
        "min_models": (int, Field(1, ge=1, description="modest: the fewest models an aggregator averages after its timeout")),
        "ping_timeout": (float, Field(5.0, gt=0, description="modest: seconds to wait for a pong or an acknowledgement")),
        "aggregation_timeout": (float, Field(
            30.0, gt=0, description="modest: seconds an aggregator waits for the sample's models"
        )),
        "round_timeout": (float, Field(
            120.0, gt=0,
            description="modest: seconds without word that a round was done before it is handed to others or restarted",
        )),
        "max_round_rate": (float, Field(
            1000.0, gt=0,
            description="modest: rounds a second that others' claims may move a peer's round estimate, past a burst of "
            "100; keep it above the swarm's own pace",
        )),
    }
    refuses = {
        "duration": ROUNDS_OF_THE_SWARM,
        "error_feedback": "the peers a model goes to change every round, so there is no error feedback; "
        "use --error-feedback none",
    }
    catches_up = False
    one_model = True
    mixes_neighbours = False
    overlay = "sampled"
    final_label = "last round's model"
    stops_serving = True

    @classmethod
    def build(cls, context: ProtocolContext, settings: Settings, *, peers: list[PeerId], joining: bool) -> MoDeST:
        return cls(
            context, local_steps=settings.local_steps, settings=cls.settings_of(settings), peers=peers, joining=joining
        )

    @classmethod
    def settings_of(cls, settings: Settings) -> ModestSettings:
        return ModestSettings(
            sample_size=settings.sample_size or DEFAULT_SAMPLE_SIZE, aggregators=settings.aggregators,
            success_fraction=settings.success_fraction, min_models=settings.min_models,
            ping_timeout=settings.ping_timeout, aggregation_timeout=settings.aggregation_timeout,
            round_timeout=settings.round_timeout, max_round_rate=settings.max_round_rate,
        )

    @classmethod
    def check(cls, settings: Settings) -> None:
        cls.settings_of(settings)

    @classmethod
    def for_swarm(cls, settings: Settings, peers: int) -> dict[str, Any]:
        if settings.sample_size is None:
            # No larger a sample than the swarm, or every round would wait out its timeout.
            return {"sample_size": min(DEFAULT_SAMPLE_SIZE, peers)}
        if settings.sample_size > peers:
            raise ValueError(f"--sample-size {settings.sample_size} is larger than the swarm of --peers {peers}")
        return {}

    @classmethod
    def describe_overlay(cls, summary: Mapping[str, Any]) -> str:
        return f"sampled, {summary['sample_size']} peers a round, {summary['aggregators']} aggregating"

    @classmethod
    def combine(cls, figures: list[dict[str, Any]], settings: Settings) -> dict[str, Any]:
        return {"peers_with_final_model": sum(bool(f.get("final_model")) for f in figures)}

    def enter(self, peers: list[PeerId], swarm_round: int) -> None:
        self.view.merge({peer: Entry(0) for peer in peers if peer != self.me})
        self.joining = swarm_round > 0

    def position(self, recorded: int, rounds: int) -> int:
        # Only aggregators record rounds; the view's estimate is the round the swarm is at.
        return min(max(self.view.estimate(), recorded), rounds)

    def holds_final_model(self) -> bool:
        # The last round's model reached us (or we averaged it), unless the run ended on a signal or
        # on word from others that it was over.
        return self.finished.is_set()

    def figures(self) -> dict[str, Any]:
        return {"rounds_aggregated": len(self._aggregated)}

    async def finish(self) -> None:
        """LEAVE to some peers, so that nobody samples us again; it also spreads word of a finished run."""
        try:
            async with asyncio.timeout(GOODBYE_TIMEOUT):
                await self.leave()
        except Exception as error:  # noqa: BLE001 - leaving must not cost the summary and the checkpoint
            log.warning("could not say goodbye: %r", error)

    def __init__(
        self,
        context: ProtocolContext,
        *,
        local_steps: int,
        settings: ModestSettings,
        peers: list[PeerId],
        joining: bool = False,
    ):
        super().__init__(context)
        self.local_steps = local_steps
        self.settings = settings
        self.joining = joining
        transport = context.transport
        self.me = transport.peer_id
        self.view = View(self.me, peers)
        self.allowance = RoundAllowance(settings.max_round_lead, settings.max_round_rate)
        self.liveness = Liveness(self._ping)
        self.models = ModelMessages(context.learner.state(), context.gossip.codec)
        self._rng = random.Random(self.me)
        self.rounds = 0
        self._started = asyncio.Event()  # models that come before run() wait for it
        # Closed when run() returns: what comes after is ignored, and nothing it started runs on.
        self.talk = Conversation(transport, context.clock, timeout=context.gossip.timeout, logger=log)
        # One model, one training at a time: a newer round's model waits for the training under way.
        self._learner_lock = asyncio.Lock()
        self.finished = asyncio.Event()
        self.training_round = -1  # the newest round this peer trains or has trained for
        self._collecting: dict[int, _Collecting] = {}
        self._aggregated: set[int] = set()  # rounds this peer has averaged
        self._done: dict[int, asyncio.Event] = {}  # rounds reported done to this peer
        self._pending_joins: dict[PeerId, Entry] = {}
        self._last_heard = 0.0
        for kind, handler in (
            (PING, self._on_ping), (JOIN, self._on_join), (LEAVE, self._on_leave), (MODEL, self._on_model),
            (TRAINED, self._on_trained), (DONE, self._on_done),
        ):
            transport.serve(kind, handler)

    # --- the peer's life ---------------------------------------------------------------

    async def run(self, rounds: int, first_round: int = 0) -> None:
        self.rounds = rounds
        self.view.cap(rounds - 1)  # nobody has finished a run that starts now; what came before is hearsay
        self._started.set()
        self._last_heard = self.context.clock.now()
        try:
            if self.joining:
                await self._join()
            elif self.me in hash_order(self.view.candidates(0, self.settings.inactivity_rounds), 0)[: self.settings.sample_size]:
                # Round 0's trainers are the first of its order: at the start every peer is up.
                self._start_training(0, None, None)
            progress = (self._progress(), self.context.clock.now())
            while not self.finished.is_set():
                if self.view.estimate() >= rounds:
                    break
                with contextlib.suppress(TimeoutError):
                    async with self.context.clock.timeout(self.settings.heartbeat):
                        await self.finished.wait()
                now = self.context.clock.now()
                if now - self._last_heard >= self.settings.heartbeat:
                    await self._heartbeat()
                if self._progress() != progress[0]:
                    progress = (self._progress(), now)
                elif now - progress[1] >= self._restart_delay() and not self.finished.is_set():
                    if self.view.estimate() >= rounds - 1:
                        break  # the last round is behind us, though word of its end is not: nothing to restart
                    await self._restart_stalled()
                    progress = (self._progress(), self.context.clock.now())
        finally:
            await self.talk.aclose()

    def _progress(self) -> tuple[int, int, int]:
        """What moves while the swarm works: the estimate, and the rounds this peer trains and averages."""
        return self.view.estimate(), self.training_round, len(self._aggregated)

    def save_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The view: who the swarm's peers are, and when each was last active, joined or left."""
        return self.view.encode(max_rows=None), {}

    def restore_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        try:
            entries = decode_view(tensors, max_round=MAX_CHECKPOINT_ROUND, max_entries=self.view.max_entries)
        except ViewError as error:
            raise ValueError(f"the saved view is damaged: {error}") from None
        entries.pop(self.me, None)  # our own entry is announced afresh as we join
        self.view.merge(entries)

    async def leave(self) -> None:
        """Say goodbye: the LEAVE spreads with the views, and nobody samples this peer again."""
        self.view.announce(left=True)
        goodbye = self._message(LEAVE, self.view.estimate())
        await asyncio.gather(*(self.talk.send(peer, goodbye) for peer in self._fanout()))
        self.finished.set()

    async def _join(self) -> None:
        self.view.announce(left=False)
        request = self._message(JOIN, 0)
        asked = [self.talk.ask(peer, request, timeout=self.settings.ping_timeout) for peer in self._fanout()]
        replies = [reply for reply in await asyncio.gather(*asked) if reply is not None]
        if not replies:
            log.warning("%s: no peer answered our JOIN; waiting to be found", self.me)
        # The swarm may be far past our estimate; a liar among those who answered cannot set it.
        reported = sorted(reply.round for reply in replies)
        median = reported[(len(reported) - 1) // 2] if reported else 0
        for reply in replies:
            self._accept(reply, max_round=max(median, self.view.estimate()) + self.settings.max_round_lead)
        self.view.touch(self.me, self.view.estimate())

    def _restart_delay(self) -> float:
        """How long without progress before this peer restarts the swarm: peers holding the most
        recent models first, then in hash order, so that one restart usually suffices."""
        estimate = self.view.estimate()
        newest = max(self.training_round, max(self._aggregated, default=-1))
        order = hash_order(self.view.candidates(estimate + 1, self.settings.inactivity_rounds), estimate + 1)
        rank = order.index(self.me) if self.me in order else len(order)
        staleness = max(0, estimate - newest)
        return self.settings.round_timeout * (2 + staleness) + rank * 2 * self.settings.ping_timeout

    async def _restart_stalled(self) -> None:
        """Nobody in reach holds a round in progress (its trainers and aggregators are gone): hand
        our own model to the next round's trainers, unless their answers show the swarm moving."""
        estimate = self.view.estimate()
        log.warning("%s: no progress past round %d; restarting round %d", self.me, estimate, estimate + 1)
        await self._hand_on(estimate, self.context.learner.state(), restart=True)

    async def _heartbeat(self) -> None:
        self._merge_pending_joins()
        peers = [p for p in self.view.entries if p != self.me and not self.view.left(p) and not self.liveness.suspected(p)]
        if peers:
            await self._ping(self._rng.choice(sorted(peers)))
        self._last_heard = self.context.clock.now()

    def _fanout(self) -> list[PeerId]:
        others = sorted(p for p in self.view.entries if p != self.me and not self.view.left(p))
        return self._rng.sample(others, min(len(others), self.settings.join_fanout * self.settings.sample_size))

    # --- messages ------------------------------------------------------------------------

    def _message(self, kind: str, round_: int, state: State | None = None, **meta) -> Message:
        tensors, codec = self.view.encode(), Identity.spec
        if state is not None:
            model, model_meta, codec = self.models.encode(state, message_seed(self.me, kind, round_))
            tensors.update(model)
            meta.update(model_meta)
        return Message(kind, self.me, round_, tensors, meta=meta, codec=codec)

    def _view_of(self, message: Message, *, max_round: int | None = None) -> dict[PeerId, Entry] | None:
        """The view a message carries; None (counted) when it is malformed, or claims a round past
        ``max_round`` (by default, the ceiling of our allowance)."""
        try:
            if message.round < 0:
                raise ViewError(f"round {message.round} is negative")
            entries = decode_view(message.tensors, max_round=MAX_CHECKPOINT_ROUND)
        except ViewError as reason:
            return self.talk.refuse(message, "malformed", str(reason))
        if max_round is None:
            max_round = self.allowance.ceiling(self.view.estimate(), self.context.clock.now())
        claimed = max(message.round, *(entry.active for entry in entries.values()))
        if claimed > max_round:
            detail = f"it claims round {claimed}, past the {max_round} the swarm can be at"
            return self.talk.refuse(message, "implausible", detail)
        return entries

    def _accept(self, message: Message, *, max_round: int | None = None) -> bool:
        """Merge the view a message carries, and take the message as a sign of life."""
        entries = self._view_of(message, max_round=max_round)
        if entries is None:
            return False
        sender, before = message.sender, self.view.estimate()
        capped = {peer: Entry(self._cap(sender, peer, e.active), e.index, e.left) for peer, e in entries.items()}
        newcomers = any(peer not in self.view.entries for peer in entries)
        self.view.hear(sender, capped, set(self.context.transport.reachable()) if newcomers else ())
        self.view.touch(sender, self._cap(sender, sender, message.round))
        self.allowance.spend(before, self.view.estimate())
        for peer, entry in entries.items():
            self.liveness.seen_active(peer, entry.active)
        self.liveness.heard_from(message.sender)
        self._last_heard = self.context.clock.now()
        return True

    def _cap(self, sender: PeerId, peer: PeerId, active: int) -> int:
        """An activity as far as we believe it: the run's end only from a peer that could have
        aggregated the last round, about itself; from anyone else, the last round at most."""
        last = self.rounds - 1
        if not self.rounds or active <= last or (peer == sender and self._could_aggregate(sender, last)):
            return active
        return last

    def _could_aggregate(self, peer: PeerId, round_: int) -> bool:
        """Whether ``peer`` is early enough in ``round_``'s order to average it: one of its first
        aggregators, or one that trainers reached past a sample's worth of dead ones. It counts as
        a candidate though it may have left since (its goodbye can overtake its last model)."""
        candidates = {*self.view.candidates(round_, self.settings.inactivity_rounds), peer}
        return peer in hash_order(candidates, round_)[: self.settings.aggregators + self.settings.sample_size]

    def _model(self, message: Message) -> State | None:
        """The model a message carries, or None (counted) when it is not one we can use."""
        parts = {name: tensor for name, tensor in message.tensors.items() if name != VIEW_TENSOR}
        try:
            return self.models.decode(parts, message.codec, message.meta)
        except InvalidState as reason:
            return self.talk.refuse(message, "invalid-model", f"its model for round {message.round}: {reason}")

    async def _request(self, peer: PeerId, message: Message) -> Message | None:
        """The reply to a request, its view merged; None when none came or it was refused. Only a
        model takes longer to transmit than a ping's timeout."""
        timeout = None if message.kind == TRAINED else self.settings.ping_timeout
        reply = await self.talk.ask(peer, message, timeout=timeout)
        return reply if reply is not None and self._accept(reply) else None

    async def _ping(self, peer: PeerId) -> bool:
        if peer == self.me:
            return True
        return await self._request(peer, self._message(PING, self.view.estimate())) is not None

    async def _on_ping(self, message: Message) -> Message | None:
        return self._message(PONG, self.view.estimate()) if self._accept(message) else None

    async def _on_join(self, message: Message) -> Message | None:
        # Merged after our next model send, so that the newcomer is not sampled in the very next round.
        entries = self._view_of(message)
        if entries is None:
            return None
        if message.sender in entries:
            self._pending_joins[message.sender] = entries[message.sender]
        return self._message(PONG, self.view.estimate())

    def _merge_pending_joins(self) -> None:
        if self._pending_joins:
            for peer, entry in self._pending_joins.items():
                self.view.hear(peer, {peer: entry}, known=())
                self.view.touch(peer, self.view.estimate())
            self._pending_joins = {}

    async def _on_leave(self, message: Message) -> None:
        self._accept(message)

    async def _on_done(self, message: Message) -> None:
        if not self._accept(message):
            return
        if not self._could_aggregate(message.sender, message.round):
            self.talk.refuse(message, "implausible", f"it did not aggregate round {message.round}")
            return
        self._done.setdefault(message.round, asyncio.Event()).set()

    # --- training ------------------------------------------------------------------------

    def _start_training(self, round_: int, state: State | None, parent: PeerId | None) -> None:
        self.training_round = round_
        self.view.touch(self.me, round_)
        self.talk.spawn(self._train(round_, state, parent))

    async def _ready(self) -> bool:
        """Wait for run() to start; False once it has returned."""
        await self._started.wait()
        return not self.talk.closed and not self.finished.is_set()

    async def _on_model(self, message: Message) -> None:
        if not self._accept(message) or not await self._ready():
            return
        last = message.round >= self.rounds - 1
        if last and not self._could_aggregate(message.sender, self.rounds - 1):
            self.talk.refuse(message, "implausible", "a final model from a peer that did not aggregate the last round")
            return
        state = self._model(message)
        if state is not None:
            state = self._screened(message, state)
        if state is None:
            return
        if last:
            async with self._learner_lock:
                self.context.learner.load_state(state)  # the final model
            self.finished.set()
        elif message.round + 1 > self.training_round:
            self._start_training(message.round + 1, state, message.sender)
        # Otherwise a later copy of a round we already train: the first copy wins.

    def _screened(self, message: Message, state: State) -> State | None:
        """An aggregated model through the outlier guard and the mixing rule, as every model mixed
        here; None (counted) when the guard stops it. With no weight on ours, the rule gives it back."""
        own = exchanged(self.context.learner.state())
        kept = screen(self.context.transport, own, {message.sender: (1.0, state)}, message.round)
        if not kept:
            return None
        return {**state, **self.context.gossip.mixing.mix(own, 0.0, list(kept.values()))}

    async def _train(self, round_: int, state: State | None, parent: PeerId | None) -> None:
        learner = self.context.learner
        async with self._learner_lock:
            if self.training_round != round_ or self.finished.is_set():
                return  # a newer round's model came while we waited
            if state is not None:
                learner.load_state(state)
            # The learning-rate schedule follows the swarm's rounds, not how often we were sampled.
            learner.set_progress(round_ * self.local_steps)
            loss = await self.context.clock.compute(learner.train, self.local_steps, steps=self.local_steps)
            if self.training_round != round_:
                return  # a newer round's model came while we trained
            trained = learner.state()
        order = hash_order(self.view.candidates(round_, self.settings.inactivity_rounds), round_)
        done = self._done.setdefault(round_, asyncio.Event())
        tried: set[PeerId] = set()
        while not done.is_set() and not self.finished.is_set() and self.training_round == round_:
            acknowledged = await self._contribute(round_, trained, loss, parent, [p for p in order if p not in tried])
            if not acknowledged:
                log.warning("%s: no aggregator of round %d acknowledged our model", self.me, round_)
                return
            tried |= acknowledged
            with contextlib.suppress(TimeoutError):
                async with self.context.clock.timeout(self.settings.round_timeout):
                    await done.wait()
            if not done.is_set():
                # They acknowledged and then went silent: the next live aggregators get our model.
                for peer in acknowledged - {self.me}:
                    self.liveness.suspect(peer, self._active(peer))

    async def _contribute(
        self, round_: int, trained: State, loss: float, parent: PeerId | None, order: list[PeerId]
    ) -> set[PeerId]:
        """Hand our model to a aggregators; one that does not acknowledge is replaced by the next live one."""
        wanted = self.settings.aggregators
        acknowledged: set[PeerId] = set()
        message = self._message(TRAINED, round_, trained, loss=loss, parent=parent or "")
        while len(acknowledged) < wanted and order:
            targets = await self.liveness.first_live(order, wanted - len(acknowledged), self._active)
            if not targets:
                break
            order = order[order.index(targets[-1]) + 1 :]
            replies = await asyncio.gather(*(self._hand_over(peer, message, trained, loss, parent) for peer in targets))
            for peer, ok in zip(targets, replies):
                if ok:
                    acknowledged.add(peer)
                else:
                    self.liveness.suspect(peer, self._active(peer))
        self._merge_pending_joins()
        return acknowledged

    async def _hand_over(self, peer: PeerId, message: Message, trained: State, loss: float, parent: PeerId | None) -> bool:
        if peer == self.me:
            self._collect(message.round, self.me, trained, loss, parent or "")
            return True
        reply = await self._request(peer, message)
        if reply is not None and reply.meta.get("done"):
            self._done.setdefault(message.round, asyncio.Event()).set()
        return reply is not None and reply.kind == ACK

    def _active(self, peer: PeerId) -> int:
        entry = self.view.entries.get(peer)
        return entry.active if entry else 0

    # --- aggregation ---------------------------------------------------------------------

    async def _on_trained(self, message: Message) -> Message | None:
        if not self._accept(message) or not await self._ready():
            return None
        if message.round in self._aggregated:
            return self._message(ACK, message.round, done=True)  # late: the round is over
        collecting = self._collecting.get(message.round)
        # What a stranger can make us buffer is bounded: a few open rounds of a few samples each.
        if collecting is None and len(self._collecting) >= MAX_OPEN_ROUNDS:
            return None
        if collecting is not None and message.sender not in collecting.models and len(collecting.models) >= 2 * self.settings.sample_size:
            return None
        state = self._model(message)
        loss, parent = message.meta.get("loss"), message.meta.get("parent")
        if state is None or not isinstance(loss, float | int) or not isinstance(parent, str) or not math.isfinite(loss):
            return None
        self._collect(message.round, message.sender, state, float(loss), parent)
        return self._message(ACK, message.round)

    def _collect(self, round_: int, sender: PeerId, state: State, loss: float, parent: str) -> None:
        if round_ in self._aggregated:
            return
        collecting = self._collecting.get(round_)
        if collecting is None:
            collecting = self._collecting[round_] = _Collecting({}, self.context.clock.now())
            self.talk.spawn(self._aggregation_timeout(round_))
        collecting.models[sender] = (state, loss, parent)
        if len(collecting.models) >= self.settings.models_needed or (
            collecting.timed_out and len(collecting.models) >= self.settings.min_models
        ):
            self._close(round_)

    async def _aggregation_timeout(self, round_: int) -> None:
        await self.context.clock.sleep(self.settings.aggregation_timeout)
        collecting = self._collecting.get(round_)
        if collecting is not None and round_ not in self._aggregated:
            collecting.timed_out = True
            if len(collecting.models) >= self.settings.min_models:
                self._close(round_)

    def _close(self, round_: int) -> None:
        """No more models for this round: later ones are told it is done."""
        self._aggregated.add(round_)
        self.talk.spawn(self._aggregate(round_, self._collecting.pop(round_)))

    async def _aggregate(self, round_: int, collecting: _Collecting) -> None:
        senders = sorted(collecting.models)
        states = [collecting.models[s][0] for s in senders]
        learner = self.context.learner
        async with self._learner_lock:
            # Centred on the model we trained for this round (a round's aggregators are the first of
            # its trainers); without one, on the model we hold, which then has no weight of its own.
            mine = collecting.models.get(self.me)
            own, own_weight = (mine[0], 1.0) if mine else (learner.state(), 0.0)
            others = {s: (1.0, collecting.models[s][0]) for s in senders if s != self.me}
            mixed = mix_screened(self.context.gossip.mixing, self.context.transport, exchanged(own), own_weight, others, round_)
            average = {**learner.state(), **mixed}
            learner.load_state(average)
        self.training_round = max(self.training_round, round_)
        last = round_ >= self.rounds - 1
        self.view.touch(self.me, self.rounds if last else round_)
        loss = sum(collecting.models[s][1] for s in senders) / len(senders)
        await self.context.round_finished(RoundReport(
            round_, loss, self.settings.models_needed, len(states),
            exchange_seconds=self.context.clock.now() - collecting.started, local_steps=self.local_steps,
        ))
        if last:
            everyone = [p for p in self.view.entries if p != self.me and not self.view.left(p) and not self.liveness.suspected(p)]
            await asyncio.gather(*(self.talk.send(peer, self._message(MODEL, round_, average)) for peer in everyone))
            self.finished.set()
        else:
            await self._hand_on(round_, average)
        parents = {collecting.models[s][2] for s in senders}
        notice = self._message(DONE, round_)
        await asyncio.gather(*(self.talk.send(peer, notice) for peer in (set(senders) | parents) - {self.me, ""}))
        self._done.setdefault(round_, asyncio.Event()).set()
        if not last:
            self.talk.spawn(self._watch(round_ + 1, average))

    async def _hand_on(self, round_: int, average: State, *, restart: bool = False) -> None:
        """Send the average of ``round_`` to the live trainers of the next round."""
        order = hash_order(self.view.candidates(round_ + 1, self.settings.inactivity_rounds), round_ + 1)
        trainers = await self.liveness.first_live(order, self.settings.sample_size, self._active)
        if restart and self.view.estimate() > round_:
            return  # their answers show the next round under way: nothing to restart
        message = self._message(MODEL, round_, average)
        for peer in trainers:
            if peer == self.me:
                if round_ + 1 > self.training_round:
                    self._start_training(round_ + 1, average, self.me)
            else:
                self.talk.tell(peer, message)
        self._merge_pending_joins()

    async def _watch(self, round_: int, previous: State) -> None:
        """Restart ``round_`` from our average of the round before when nobody reports it done."""
        done = self._done.setdefault(round_, asyncio.Event())
        while not self.finished.is_set():
            with contextlib.suppress(TimeoutError):
                async with self.context.clock.timeout(self.settings.round_timeout):
                    await done.wait()
            if done.is_set() or self.finished.is_set() or self.view.estimate() > round_:
                return
            log.warning("%s: round %d was not completed in time; restarting it", self.me, round_)
            await self._hand_on(round_ - 1, previous)

