"""Asynchronous gossip: no rounds, nobody waits (docs/algorithms.md#asynchronous-gossip; SWIFT's wait-free
mixing, FedBuff's staleness weight, asynchronous Local-SGD's local work in proportion to speed).

An iteration: K local steps; then the model the peer started the iteration from is mixed with
the newest model held from each in-neighbour, each weighted by its staleness
(``gossip.wait_free``), what the K steps learnt is added to the result in full (as AD-PSGD
applies its gradient to the averaged model), and the model is sent to the out-neighbours
without waiting. Mixing the starting model, not the trained one, is what keeps a peer's progress:
its neighbours' newest models are of the previous iteration at best, and mixing them with the
trained model would take back part of each iteration's steps. With equal speeds this is
D-PSGD with ``mix_start`` (x <- W x + local update).

A slow or dead neighbour never blocks anyone: its last model is mixed, staler every iteration,
until it is past the staleness bound. With adaptive local steps a peer takes as many steps per
iteration as its speed allows next to the fastest (``gossip.adaptive_steps``).

The iteration is a logical clock: after a mix a peer goes on from the iteration that most of
its neighbours have reached, if that is ahead of its own, and its learning rate follows the
schedule at that iteration. A jump goes no further than the last iteration: a peer whose
neighbours have finished still takes it, from their final models. A model stamped past the run's
last iteration is refused.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from gossip.adaptive_steps import AdaptiveSteps
from gossip.greeting import Greeting
from gossip.learner import with_update
from gossip.message import PeerId
from gossip.protocols.base import Protocol, ProtocolContext, RoundReport, Settings
from gossip.wait_free import STALENESS_HELP, parse_staleness
from topology import is_drawn

WITHOUT_ROUNDS = ", whose peers do not share rounds"


def _known_staleness(spec: str) -> str:
    parse_staleness(spec)
    return spec


class AsyncGossip(Protocol):
    name = "async-gossip"
    label = "Asynchronous gossip (no rounds, staleness-weighted mixing)"
    own_settings = {
        "staleness": (Annotated[str, AfterValidator(_known_staleness)], Field(
            "poly:0.5", description=f"async-gossip: how a neighbour's model is discounted by its staleness: {STALENESS_HELP}"
        )),
        "max_staleness": (int, Field(
            32, ge=0, description="async-gossip: a neighbour's model more than this many iterations behind ours is not mixed"
        )),
    }
    takes = {
        "topology": "", "weights": "", "duration": "", "sam_rho": "", "staleness": WITHOUT_ROUNDS,
        "max_staleness": WITHOUT_ROUNDS, "adaptive_steps": WITHOUT_ROUNDS,
    }
    refuses = {
        "gossip_steps": "a peer mixes once per iteration with what it holds; --gossip-steps is for rounds",
        "mix_point": "--mix-point has no choice here: a peer always mixes the model it started the iteration from",
        "error_feedback": "error feedback keeps per-link copies that both ends update at the same exchange, "
        "which peers without rounds never share; use --error-feedback none",
    }
    rounds_shared = False
    round_word = "iterations"

    @classmethod
    def check(cls, settings: Settings) -> None:
        if is_drawn(settings.topology):
            raise ValueError(
                f"async-gossip: --topology {settings.topology} draws its links afresh for each step, and peers without "
                "rounds are at different steps, so a model would seldom reach a peer that waits for it; use a fixed "
                "graph (regular:D) or base:K"
            )

    @classmethod
    def build(cls, context: ProtocolContext, settings: Settings, *, peers: list[PeerId], joining: bool) -> AsyncGossip:
        return cls(context, local_steps=settings.local_steps, adaptive=settings.adaptive_steps, joining=joining)

    def position(self, recorded: int, rounds: int) -> int:
        return min(self.iteration, rounds)  # past the iterations it jumped over

    def __init__(self, context: ProtocolContext, *, local_steps: int, adaptive: bool = False, joining: bool = False):
        super().__init__(context)
        self.local_steps = local_steps
        self.pace = AdaptiveSteps(local_steps)
        self.adaptive = adaptive
        self.joining = joining
        self.exchange = context.wait_free_exchange()
        self.iteration = 0
        self.greeting = Greeting(context, lambda: self.iteration)

    async def run(self, rounds: int, first_round: int = 0) -> None:
        learner, clock = self.context.learner, self.context.clock
        self.exchange.set_run_length(rounds)
        self.iteration = first_round
        if self.joining:
            self.iteration = max(first_round, await self.greeting.join())
        try:
            previous = self.iteration - 1
            while self.iteration < rounds:
                steps = self.pace.steps() if self.adaptive else self.local_steps
                learner.set_progress(self.iteration * self.local_steps)
                start = learner.state()
                started = clock.now()
                loss = await clock.compute(learner.train, steps, steps=steps)
                self.pace.measured(steps, clock.now() - started)
                stamp = self.iteration
                mixing_started = clock.now()
                # The model we started from is mixed (it is of the iteration before this one, like the
                # newest of our neighbours'), and what our steps learnt is added back in full.
                result = self.exchange.mix(stamp - 1, start)
                model = with_update(result.state, start, learner.state())
                learner.load_state(model)
                self.exchange.publish(stamp, model, self.pace.fastest())
                self.pace.heard(result.fastest)
                # On to the iteration most neighbours have reached, but no further than the last: a peer
                # that jumps there still takes the last iteration (from their final models) and records it.
                self.iteration = max(stamp + 1, min(result.reached + 1, rounds - 1))
                last = self.iteration >= rounds or self.context.past_deadline()
                await self.context.round_finished(RoundReport(
                    stamp, loss, result.expected, result.heard, exchange_seconds=clock.now() - mixing_started,
                    local_steps=steps, span=stamp - previous, last=last,
                ))
                previous = stamp
                if last:
                    break
            await self.exchange.flush()  # the neighbours get our last model
        finally:
            self.exchange.close()

    async def leave(self) -> None:
        await self.greeting.leave()

