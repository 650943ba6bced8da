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

With a lossy ``--codec`` the pseudo-gradients are compressed, and what the codec dropped is added
to the next one (error feedback); start points travel through the same codec with nothing fed
back (only the pull between them sees its error).

A round whose average fails (no group formed, a member died mid-way) moves nobody: the peer keeps
its start point and sends its pseudo-gradient with the next round's. If the others' average did
not fail, it then takes their start point and outer momentum, so that one missed round does not
set it apart for good. A newcomer asks a running peer for the same, and for its round.
A checkpoint holds the outer momentum and the error feedback's residual besides the model (the
start point of the next round) and the inner optimiser's state, so a resumed peer takes the same
next outer step.
"""

from __future__ import annotations

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
from gossip.outer import ErrorFeedback, OuterOptimizer, difference, floating
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
    }
    takes = {"topology": "", "weights": "", "duration": ""}
    catches_up = False
    mixes_neighbours = True

    @classmethod
    def build(cls, context: ProtocolContext, settings: Settings, *, peers: list[PeerId], joining: bool) -> DiLoCo:
        mix = OuterMix.parse(settings.outer_mix)
        outer = OuterOptimizer(
            settings.outer_optimizer or DEFAULT_OPTIMIZER[mix.kind], settings.outer_lr,
            DEFAULT_MOMENTUM[mix.kind] if settings.outer_momentum is None else settings.outer_momentum,
        )
        return cls(context, mix, outer, local_steps=settings.local_steps, seed=settings.seed, joining=joining)

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
        if mix.kind == "all" and settings.given("mixing"):
            raise ValueError(
                "--mixing needs every pseudo-gradient, and an all-reduce hands back only their mean; use it with "
                "--outer-mix gossip:S or neighbours"
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
            "outer_optimizer": settings.outer_optimizer or DEFAULT_OPTIMIZER[kind],
            "outer_momentum": DEFAULT_MOMENTUM[kind] if momentum is None else momentum,
        }

    @classmethod
    def table_rows(cls, summary: Mapping[str, Any]) -> list[tuple[str, str]]:
        step = f"{summary['outer_optimizer']}, lr {summary['outer_lr']:g}, momentum {summary['outer_momentum']:g}"
        rows = [("outer step", step)]
        if summary["codec"] != "none":
            rows.append(("pseudo-gradients", f"{summary['codec']}, error feedback"))
        return rows

    @classmethod
    def describe_overlay(cls, summary: Mapping[str, Any]) -> str:
        mix = summary["outer_mix"]
        if mix == "neighbours":
            return f"outer mix neighbours, {super().describe_overlay(summary)}"
        return "outer mix all (every live peer)" if mix == "all" else f"outer mix {mix} (random groups every round)"

    def __init__(
        self, context: ProtocolContext, mix: OuterMix, outer: OuterOptimizer, *, local_steps: int, seed: int = 0,
        joining: bool = False,
    ):
        super().__init__(context)
        self.mix = mix
        self.outer = outer
        self.local_steps = local_steps
        self.joining = joining
        self.feedback = ErrorFeedback()
        self.stray = False  # its last average failed: at the next round it takes the swarm's start point
        start = floating(context.learner.state())
        self.reference = start
        self.start = start  # the start point of this round
        self.welcome = Message(WELCOME, context.transport.peer_id, 0)  # what a newcomer is given, set by _publish
        self.combine = self._combiner(seed)
        context.transport.serve(HELLO, self._on_hello)

    def _combiner(self, seed: int):
        if self.mix.kind == "all":
            if self.context.averaging is None:
                raise ValueError("--outer-mix all needs the world's averaging in groups, and none was given")
            self.models = ModelMessages(self.reference, self.context.gossip.codec)
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
        learner, clock = self.context.learner, self.context.clock
        if self.mix.kind != "all":
            self.exchange.set_run_length(rounds)
        round_ = first_round
        if self.joining:
            round_ = max(first_round, await self._join(rounds))
            learner.set_progress(round_ * self.local_steps)
        while round_ < rounds:
            self._publish(round_, floating(learner.state()))
            if self.stray:
                round_ = await self._resync(rounds, round_)
                self._publish(round_, floating(learner.state()))
            loss = await clock.compute(learner.train, self.local_steps, steps=self.local_steps)
            trained = learner.state()
            started = clock.now()
            combined = await self.combine(round_, difference(self.start, trained))
            if combined.gradient is None:  # nothing averaged: start the next round where this one started
                learner.load_state({**trained, **self.start})
            else:
                learner.load_state({**trained, **self.outer.step(self.start, combined.gradient)})
            out_of_time = self.context.past_deadline()
            await self.context.round_finished(RoundReport(
                round_, loss, combined.expected, combined.heard, exchange_seconds=clock.now() - started,
                local_steps=self.local_steps, last=out_of_time,
            ))
            if out_of_time:
                return
            next_round = max(round_ + 1, combined.newest)
            if next_round > round_ + 1:
                learner.set_progress(next_round * self.local_steps)
            round_ = next_round
        self._publish(rounds, floating(learner.state()))

    def _publish(self, round_: int, start: State) -> None:
        """Start ``round_`` at ``start``; a newcomer gets both, with the outer momentum that goes with them."""
        self.start = start
        velocity = {name: self.outer.velocity[name].clone() if name in self.outer.velocity else torch.zeros_like(t)
                    for name, t in start.items()}
        tensors = {**_prefixed("start.", start), **_prefixed("velocity.", velocity)}
        self.welcome = Message(WELCOME, self.context.transport.peer_id, round_, tensors, meta={"stray": self.stray})

    async def _average_all(self, round_: int, delta: State) -> Combined:
        total = self.feedback.with_residual(delta)
        me = self.context.transport.peer_id
        tensors, meta, codec = self.models.encode(total, message_seed(me, "outer", round_))
        sent = self.models.decode(tensors, codec, meta)  # what every member of the group will average
        expected = len(self.context.transport.reachable())
        averaged = await self.context.averaging.average(round_, sent, self.context.gossip.timeout)
        if averaged is None:
            # Applied alone, its own pseudo-gradient would move its start point away from everyone
            # else's for good: it is kept for the next round instead, and the start point too.
            self.feedback.keep(total, {name: torch.zeros_like(tensor) for name, tensor in total.items()})
            self.stray = expected > 0
            return Combined(None, expected, 0, round_)
        self.feedback.keep(total, sent)
        return Combined(averaged.state, expected, len(averaged.group) - 1, round_)

    async def _average_with_group(self, round_: int, delta: State) -> Combined:
        total = self.feedback.with_residual(delta)
        result = await self.exchange.step(round_, {**_prefixed("start.", self.start), **_prefixed("delta.", total)})
        self.feedback.keep(total, _unprefixed("delta.", result.sent))
        mean_start, mean_delta = _unprefixed("start.", result.state), _unprefixed("delta.", result.state)
        gradient = {name: mean_delta[name] + self.start[name] - mean_start[name] for name in self.start}
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
        self.context.learner.load_state({**self.context.learner.state(), **_unprefixed("start.", welcome.tensors)})
        self.outer.load_velocity(_unprefixed("velocity.", welcome.tensors))

    # --- what the program asks of it ---------------------------------------------------------

    def save_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {**_prefixed("velocity.", self.outer.velocity), **_prefixed("residual.", self.feedback.residual)}
        return tensors, {"outer_optimizer": self.outer.kind}

    def restore_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta.get("outer_optimizer") != self.outer.kind:
            raise ValueError(f"it was saved with the {meta.get('outer_optimizer')!r} outer optimizer, not {self.outer.kind!r}")
        velocity, residual = _unprefixed("velocity.", tensors), _unprefixed("residual.", tensors)
        if len(velocity) + len(residual) != len(tensors):
            raise ValueError("it holds tensors other than an outer velocity and a residual")
        for part in (velocity, residual):
            if part:
                check_state(part, self.reference)
        self.outer.load_velocity(velocity)
        self.feedback.load(residual)


def _prefixed(prefix: str, state: State) -> State:
    return {prefix + name: tensor for name, tensor in state.items()}


def _unprefixed(prefix: str, state: State) -> State:
    return {name[len(prefix):]: tensor for name, tensor in state.items() if name.startswith(prefix)}


def _paired(reference: State) -> State:
    """The layout of what a group exchanges: a start point and a pseudo-gradient."""
    return {**_prefixed("start.", reference), **_prefixed("delta.", reference)}

