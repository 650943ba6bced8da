"""DiLoCo: H inner steps with the task's own optimiser, then an outer step on the peers' combined
pseudo-gradients (docs/algorithms.md#diloco).

Each outer round a peer trains H steps from its start point x (its inner optimiser keeps its state
across rounds) and ends at y; its pseudo-gradient is d = x - y. ``--outer-mix`` says how the
peers' pseudo-gradients become the outer gradient g that ``gossip.outer`` applies to x:

- ``all``: the mean over every live peer, through the world's averaging in groups (exact in the
  simulator, hivemind's all-reduce between real peers); g = mean d. All peers keep one start point.
- ``gossip:S``: groups of S + 1 peers drawn at random every round (NoLoCo): each averages its start
  point and pseudo-gradient with its group only, and g = mean d + (x - mean x): the second term pulls
  the start points together, so that they stay close without any global average.
- ``neighbours``: the same update with the topology's mixing weights in place of a random group.

With ``all`` the model may be streamed (Streaming DiLoCo): ``--fragments F`` combines one fragment
of consecutive tensors per round, in turn, each with its own start point (the others train on), and
``--overlap T`` lets a combination travel while the next T inner steps run, merging its outer update
with the local copy when it lands.

With a lossy ``--codec`` the pseudo-gradients are compressed, and what the codec dropped is added
to the next one (``--error-feedback residual[:BETA]``); start points travel through the same codec
with nothing fed back (only the pull between them sees its error).

A round whose average fails (no group formed, a member died mid-way) moves nobody: the peer keeps
its start point and sends its pseudo-gradient with the next round's. If the others' average did
not fail, it then takes their start point and outer momentum, so that one missed round does not
set it apart for good. A newcomer asks a running peer for the same, and for its round.
A checkpoint holds the outer momentum and the error feedback's residual besides the model (the
start point of the next round) and the inner optimiser's state, so a resumed peer takes the same
next outer step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from gossip.exchange import Exchange, NeighbourExchange, message_seed
from gossip.learner import State
from gossip.message import Message, PeerId
from gossip.model_codec import ModelMessages
from gossip.neighbourhood import Neighbourhood, RandomGroups
from gossip.outer import ErrorFeedback, OuterOptimizer, difference, floating, split_fragments, subset
from gossip.protocols.base import Protocol, ProtocolContext, RoundReport, Settings
from gossip.transport import PeerUnreachable
from gossip.validation import InvalidState, check_state

log = logging.getLogger(__name__)

HELLO = "outer-hello"  # a newcomer to a running peer; answered with WELCOME
WELCOME = "outer-welcome"  # the start point and outer momentum of the round the newcomer starts at
RESYNC_RETRY = 0.5  # seconds between asks of a peer whose average failed, while the others still average

MIXES = "all, gossip:S (S a whole number >= 1) or neighbours"
# The published settings of each mix's outer step: DiLoCo's (Nesterov, 0.9) for the all-reduce,
# NoLoCo's (heavy ball, 0.3) for groups that pull their start points together.
DEFAULT_OPTIMIZER = {"all": "nesterov", "gossip": "sgd", "neighbours": "sgd"}
DEFAULT_MOMENTUM = {"all": 0.9, "gossip": 0.3, "neighbours": 0.3}


@dataclass(frozen=True)
class OuterMix:
    kind: str  # all | gossip | neighbours
    group_size: int = 0  # gossip: the peers of a group, this one included

    @classmethod
    def parse(cls, spec: str) -> OuterMix:
        if spec in ("all", "neighbours"):
            return cls(spec)
        kind, _, size = spec.partition(":")
        if kind == "gossip" and size.isdigit() and int(size) >= 1:
            return cls("gossip", int(size) + 1)
        raise ValueError(f"--outer-mix {spec[:40]!r} is not one of {MIXES}")


@dataclass(frozen=True)
class Streaming:
    """How the model is combined piece by piece (Streaming DiLoCo): ``fragments`` groups of
    consecutive tensors, fragment f at rounds f, f + F, ...; each combination travels while the next
    ``overlap`` inner steps run, and is then merged with the local copy, keeping ``keep`` of it."""

    fragments: int = 1
    overlap: int = 0
    keep: float = 0.5


@dataclass
class Pending:
    """A fragment's combination on its way."""

    fragment: tuple[str, ...]
    task: asyncio.Task


@dataclass(frozen=True)
class Combined:
    gradient: State | None  # the outer gradient; None: no outer step this round
    expected: int  # the peers this round's combination waited for
    heard: int  # of those, the ones whose pseudo-gradients are in it
    newest: int  # the round most of them have reached (a peer behind moves there)


class DiLoCo(Protocol):
    name = "diloco"
    label = "DiLoCo (outer-optimizer training)"
    own_settings = {
        "outer_mix": (str, Field("all", description=f"diloco: how the pseudo-gradients are combined: {MIXES}")),
        "outer_optimizer": (str | None, Field(
            None, description="diloco: nesterov or sgd (default: nesterov with --outer-mix all, else sgd as NoLoCo)",
        )),
        "outer_lr": (float, Field(0.7, gt=0, description="diloco: the outer step's learning rate")),
        "outer_momentum": (float | None, Field(
            None, ge=0, lt=1, description="diloco: the outer momentum (default: 0.9 with --outer-mix all, else 0.3)",
        )),
        "fragments": (int, Field(
            1, ge=1, description="diloco: split the model into this many fragments of consecutive tensors; fragment f "
            "is combined at outer rounds f, f + F, ..., so a round sends 1/F of the model (needs --outer-mix all)",
        )),
        "overlap": (int, Field(
            0, ge=0, description="diloco: inner steps that go on while a combination travels; its outer update is "
            "merged in that many steps later (0: wait for it; at most --local-steps; needs --outer-mix all)",
        )),
        "overlap_keep": (float, Field(
            0.5, ge=0, le=1, description="diloco: the share of the local copy kept when a late outer update is merged "
            "(0: take the update as it is)",
        )),
    }
    takes = {"topology": "", "weights": "", "duration": "", "error_feedback": ""}
    compresses = "updates"
    catches_up = False
    mixes_neighbours = True

    @classmethod
    def build(cls, context: ProtocolContext, settings: Settings, *, peers: list[PeerId], joining: bool) -> DiLoCo:
        mix = OuterMix.parse(settings.outer_mix)
        outer = OuterOptimizer(
            settings.outer_optimizer or DEFAULT_OPTIMIZER[mix.kind], settings.outer_lr,
            DEFAULT_MOMENTUM[mix.kind] if settings.outer_momentum is None else settings.outer_momentum,
        )
        return cls(
            context, mix, outer, local_steps=settings.local_steps, seed=settings.seed, joining=joining,
            streaming=Streaming(settings.fragments, settings.overlap, settings.overlap_keep),
            feedback=ErrorFeedback.parse(settings.error_feedback_spec),
        )

    @classmethod
    def check(cls, settings: Settings) -> None:
        mix = OuterMix.parse(settings.outer_mix)
        if settings.outer_optimizer is not None and settings.outer_optimizer not in DEFAULT_OPTIMIZER.values():
            raise ValueError(f"--outer-optimizer {settings.outer_optimizer[:40]!r} is not one of nesterov, sgd")
        if mix.kind != "neighbours":
            for name in ("topology", "weights"):
                if settings.given(name):
                    raise ValueError(
                        f"--{name} sets the graph of --outer-mix neighbours; --outer-mix {settings.outer_mix} does not "
                        "use one (leave it out, or give --outer-mix neighbours)"
                    )
        if mix.kind != "all" and (settings.fragments > 1 or settings.overlap):
            raise ValueError(
                "--fragments and --overlap stream the model through the all-reduce: give them with --outer-mix all "
                f"(--outer-mix {settings.outer_mix} exchanges whole start points with each group)"
            )
        if settings.overlap > settings.local_steps:
            raise ValueError(
                f"--overlap {settings.overlap} is more inner steps than a round has (--local-steps "
                f"{settings.local_steps}): a combination must land before the next one leaves"
            )
        if mix.kind == "all" and settings.given("mixing"):
            raise ValueError(
                "--mixing needs every pseudo-gradient, and an all-reduce hands back only their mean; use it with "
                "--outer-mix gossip:S or neighbours"
            )

    @classmethod
    def check_model(cls, state: Mapping[str, Any], settings: Settings) -> None:
        tensors = len(floating(dict(state)))
        if settings.fragments > tensors:
            raise ValueError(
                f"--fragments {settings.fragments}: a fragment is one tensor or more, and this model has {tensors}; "
                f"give at most {tensors}"
            )

    @classmethod
    def averages(cls, settings: Settings) -> bool:
        return OuterMix.parse(settings.outer_mix).kind == "all"

    @classmethod
    def options(cls, settings: Settings) -> dict[str, Any]:
        """The outer step as it runs: the defaults of its mix filled in."""
        kind = OuterMix.parse(settings.outer_mix).kind
        momentum = settings.outer_momentum
        return {
            **super().options(settings),
            "error_feedback": settings.error_feedback_spec,
            "outer_optimizer": settings.outer_optimizer or DEFAULT_OPTIMIZER[kind],
            "outer_momentum": DEFAULT_MOMENTUM[kind] if momentum is None else momentum,
        }

    @classmethod
    def table_rows(cls, summary: Mapping[str, Any]) -> list[tuple[str, str]]:
        step = f"{summary['outer_optimizer']}, lr {summary['outer_lr']:g}, momentum {summary['outer_momentum']:g}"
        rows = [("outer step", step)]
        if summary["fragments"] > 1 or summary["overlap"]:
            late = f", merged {summary['overlap']} inner steps later keeping {summary['overlap_keep']:g} of the local copy"
            rows.append(("streaming", f"{summary['fragments']} fragments, one a round{late if summary['overlap'] else ''}"))
        return rows

    @classmethod
    def describe_overlay(cls, summary: Mapping[str, Any]) -> str:
        mix = summary["outer_mix"]
        if mix == "neighbours":
            return f"outer mix neighbours, {super().describe_overlay(summary)}"
        return "outer mix all (every live peer)" if mix == "all" else f"outer mix {mix} (random groups every round)"

    def __init__(
        self, context: ProtocolContext, mix: OuterMix, outer: OuterOptimizer, *, local_steps: int, seed: int = 0,
        joining: bool = False, streaming: Streaming = Streaming(), feedback: ErrorFeedback | None = None,
    ):
        super().__init__(context)
        self.mix = mix
        self.outer = outer
        self.local_steps = local_steps
        self.joining = joining
        self.streaming = streaming
        self.feedback = feedback or ErrorFeedback()
        self.stray = False  # its last average failed: at the next round it takes the swarm's start point
        start = floating(context.learner.state())
        self.reference = start
        self.fragments = split_fragments(start, streaming.fragments)
        # Each fragment's start point: where it was when it was last combined (set again when the run
        # starts, from the model then and the start points a checkpoint gave).
        self.start = dict(start)
        self.saved_start: State = {}
        self.pending: Pending | None = None  # the combination on its way, while inner steps overlap it
        self.welcome = Message(WELCOME, context.transport.peer_id, 0)  # what a newcomer is given, set by _publish
        self.combine = self._combiner(seed)
        context.transport.serve(HELLO, self._on_hello)

    def _combiner(self, seed: int):
        if self.mix.kind == "all":
            if self.context.averaging is None:
                raise ValueError("--outer-mix all needs the world's averaging in groups, and none was given")
            codec = self.context.gossip.codec
            self.models = {names: ModelMessages(subset(self.reference, names), codec) for names in self.fragments}
            return self._average_all
        neighbourhood: Neighbourhood | None = self.context.neighbourhood
        if self.mix.kind == "gossip":
            transport = self.context.transport
            neighbourhood = RandomGroups(transport.peer_id, transport.reachable, self.mix.group_size, seed=seed)
        if neighbourhood is None:
            raise ValueError("--outer-mix neighbours needs a neighbourhood")
        gossip = self.context.gossip
        self.exchange: Exchange = NeighbourExchange(
            self.context.transport, self.context.clock, neighbourhood, _paired(self.reference),
            timeout=gossip.timeout, mixing=gossip.mixing, codec=gossip.codec, mix_as_sent=True,
        )
        return self._average_with_group

    # --- a round -----------------------------------------------------------------------------

    async def run(self, rounds: int, first_round: int = 0) -> None:
        learner = self.context.learner
        if self.mix.kind != "all":
            self.exchange.set_run_length(rounds)
        self.start = {**floating(learner.state()), **self.saved_start}
        round_ = first_round
        if self.joining:
            round_ = max(first_round, await self._join(rounds))
            learner.set_progress(round_ * self.local_steps)
        try:
            await self._rounds(rounds, round_)
        finally:
            if self.pending is not None:  # a crash or a cancelled run leaves no combination behind
                self.pending.task.cancel()
        self._publish(rounds)

    async def _rounds(self, rounds: int, round_: int) -> None:
        learner = self.context.learner
        while round_ < rounds:
            if self.stray:
                await self._settle(late=True)
                round_ = await self._resync(rounds, round_)
            self._publish(round_)
            loss, waited, combined = await self._train()
            fragment = self.fragments[round_ % len(self.fragments)]
            delta = difference(subset(self.start, fragment), learner.state())
            self.pending = Pending(fragment, asyncio.ensure_future(self.combine(round_, delta)))
            out_of_time = self.context.past_deadline()
            if not (self.streaming.overlap and round_ + 1 < rounds and not out_of_time):
                seconds, combined = await self._settle(late=False)
                waited += seconds
            await self.context.round_finished(RoundReport(
                round_, loss, combined.expected if combined else 0, combined.heard if combined else 0,
                exchange_seconds=waited, local_steps=self.local_steps, last=out_of_time,
            ))
            if out_of_time:
                return
            next_round = max(round_ + 1, combined.newest if combined and self.pending is None else 0)
            if next_round > round_ + 1:
                learner.set_progress(next_round * self.local_steps)
            round_ = next_round

    async def _train(self) -> tuple[float, float, Combined | None]:
        """A round's inner steps: the mean loss, the seconds spent waiting for the last round's
        combination (when it overlaps them: it lands ``overlap`` steps in) and what it combined."""
        learner, clock, steps = self.context.learner, self.context.clock, self.local_steps
        if self.pending is None:
            return await clock.compute(learner.train, steps, steps=steps), 0.0, None
        early = self.streaming.overlap
        loss = await clock.compute(learner.train, early, steps=early)
        waited, combined = await self._settle(late=True)
        if early < steps:
            later = await clock.compute(learner.train, steps - early, steps=steps - early)
            loss = (loss * early + later * (steps - early)) / steps
        return loss, waited, combined

    async def _settle(self, *, late: bool) -> tuple[float, Combined | None]:
        """Wait for the combination on its way (if any) and apply its outer step to its fragment:
        the seconds waited, and the combination. ``late``: inner steps ran meanwhile, and the
        update is merged with them."""
        pending, self.pending = self.pending, None
        if pending is None:
            return 0.0, None
        clock, learner = self.context.clock, self.context.learner
        started = clock.now()
        combined: Combined = await pending.task
        waited = clock.now() - started
        start = subset(self.start, pending.fragment)
        # A failed combination leaves its fragment where it started: its pseudo-gradient goes out later.
        moved = start if combined.gradient is None else self.outer.step(start, combined.gradient)
        local = learner.state()
        keep = self.streaming.keep if late else 0.0
        merged = {name: torch.lerp(moved[name], local[name], keep) if keep else moved[name] for name in pending.fragment}
        learner.load_state({**local, **merged})
        self.start.update(moved)
        return waited, combined

    def _publish(self, round_: int) -> None:
        """A newcomer asking now starts ``round_`` at our start points, with the outer momentum that goes with them."""
        velocity = {name: self.outer.velocity[name].clone() if name in self.outer.velocity else torch.zeros_like(t)
                    for name, t in self.start.items()}
        tensors = {**_prefixed("start.", self.start), **_prefixed("velocity.", velocity)}
        self.welcome = Message(WELCOME, self.context.transport.peer_id, round_, tensors, meta={"stray": self.stray})

    async def _average_all(self, round_: int, delta: State) -> Combined:
        total = self.feedback.with_residual(delta)
        me = self.context.transport.peer_id
        models = self.models[tuple(delta)]
        tensors, meta, codec = models.encode(total, message_seed(me, "outer", round_))
        sent = models.decode(tensors, codec, meta)  # what every member of the group will average
        expected = len(self.context.transport.reachable())
        averaged = await self.context.averaging.average(round_, sent, self.context.gossip.timeout)
        if averaged is None:
            # Applied alone, its own pseudo-gradient would move its start point away from everyone
            # else's for good: it is kept for the next round instead, and the start point too.
            self.feedback.hold(total)
            self.stray = expected > 0
            return Combined(None, expected, 0, round_)
        self.feedback.keep(total, sent)
        return Combined(averaged.state, expected, len(averaged.group) - 1, round_)

    async def _average_with_group(self, round_: int, delta: State) -> Combined:
        total = self.feedback.with_residual(delta)
        start = self.start
        result = await self.exchange.step(round_, {**_prefixed("start.", start), **_prefixed("delta.", total)})
        self.feedback.keep(total, _unprefixed("delta.", result.sent))
        mean_start, mean_delta = _unprefixed("start.", result.state), _unprefixed("delta.", result.state)
        gradient = {name: mean_delta[name] + start[name] - mean_start[name] for name in start}
        return Combined(gradient, len(result.expected), result.heard, result.newest_step)

    # --- newcomers ---------------------------------------------------------------------------

    def enter(self, peers: list[PeerId], swarm_round: int) -> None:
        self.joining = swarm_round > 0

    async def _on_hello(self, message: Message) -> Message | None:
        return self.welcome if self.welcome.tensors else None

    async def _join(self, rounds: int) -> int:
        """The round to start at, with the start point and momentum of the first peer that welcomes us."""
        async for welcome in self._welcomes(rounds, at_least=0):
            self._take(welcome)
            return welcome.round
        log.warning("%s: no peer welcomed us; starting alone from round 0", self.context.transport.peer_id)
        return 0

    async def _resync(self, rounds: int, round_: int) -> int:
        """After a round whose average failed: the start point and momentum of a peer whose average
        did not, for ``round_`` or a later round; the round to go on at. Asked again until one has
        it, or until a peer whose average failed too says that the whole group failed (nobody
        moved, and every start point is still the same), or the timeout."""
        clock = self.context.clock
        # The others may still be waiting for us, up to their own timeout, and then averaging.
        deadline = clock.now() + 2 * self.context.gossip.timeout
        while clock.now() < deadline:
            async for welcome in self._welcomes(rounds, at_least=round_):
                if welcome.meta.get("stray") is False:
                    self._take(welcome)
                    if welcome.round > round_:
                        self.context.learner.set_progress(welcome.round * self.local_steps)
                    self.stray = False
                    return welcome.round
                if welcome.meta.get("stray") is True:
                    self.stray = False
                    return round_
            await clock.sleep(RESYNC_RETRY)
        log.warning("%s: no peer had the swarm's start point for round %d; going on from ours", self.context.transport.peer_id, round_)
        self.stray = False
        return round_

    async def _welcomes(self, rounds: int, *, at_least: int) -> AsyncIterator[Message]:
        """The valid welcomes of the reachable peers, asked one after the other (until the caller
        has one it takes), for a round from ``at_least`` to the run's end."""
        transport = self.context.transport
        expected = {**_prefixed("start.", self.reference), **_prefixed("velocity.", self.reference)}
        for peer in sorted(transport.reachable()):
            try:
                reply = await transport.request(peer, Message(HELLO, transport.peer_id, 0), self.context.gossip.timeout)
                if reply.kind != WELCOME or not at_least <= reply.round <= rounds:
                    raise InvalidState(f"expected a {WELCOME!r} for round {at_least} or later, got {reply.kind!r} for {reply.round}")
                check_state(reply.tensors, expected)
            except (TimeoutError, PeerUnreachable, InvalidState) as reason:
                log.info("%s: no welcome from %s: %r", transport.peer_id, peer, reason)
                continue
            yield reply

    def _take(self, welcome: Message) -> None:
        self.start = _unprefixed("start.", welcome.tensors)
        self.context.learner.load_state({**self.context.learner.state(), **self.start})
        self.outer.load_velocity(_unprefixed("velocity.", welcome.tensors))

    # --- what the program asks of it ---------------------------------------------------------

    def save_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The outer momentum, the error feedback's tensors and, where fragments are combined in turn
        (so that the model is not every fragment's start point), the start points."""
        parts = {"velocity.": self.outer.velocity, "residual.": self.feedback.residual, "unsent.": self.feedback.unsent}
        if len(self.fragments) > 1:
            parts["start."] = self.start
        tensors = {name: tensor for prefix, state in parts.items() for name, tensor in _prefixed(prefix, state).items()}
        return tensors, {"outer_optimizer": self.outer.kind}

    def restore_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta.get("outer_optimizer") != self.outer.kind:
            raise ValueError(f"it was saved with the {meta.get('outer_optimizer')!r} outer optimizer, not {self.outer.kind!r}")
        parts = {prefix: _unprefixed(prefix, tensors) for prefix in ("velocity.", "residual.", "unsent.", "start.")}
        if sum(map(len, parts.values())) != len(tensors):
            raise ValueError("it holds tensors other than an outer velocity, error feedback and start points")
        for part in parts.values():
            if part:
                check_state(part, {name: ref for name, ref in self.reference.items() if name in part})
        self.outer.load_velocity(parts["velocity."])
        self.feedback.load(parts["residual."], parts["unsent."])
        self.saved_start = parts["start."]

def _prefixed(prefix: str, state: State) -> State:
    return {prefix + name: tensor for name, tensor in state.items()}


def _unprefixed(prefix: str, state: State) -> State:
    return {name[len(prefix):]: tensor for name, tensor in state.items() if name.startswith(prefix)}


def _paired(reference: State) -> State:
    """The layout of what a group exchanges: a start point and a pseudo-gradient."""
    return {**_prefixed("start.", reference), **_prefixed("delta.", reference)}

