"""Asynchronous gossip: no rounds, nobody waits (ALGORITHMS.md section 7; SWIFT's wait-free
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
schedule at that iteration. A model stamped past the run's last iteration is refused.
"""

from __future__ import annotations

from gossip.adaptive_steps import AdaptiveSteps
from gossip.greeting import Greeting
from gossip.learner import with_update
from gossip.protocols.base import Protocol, ProtocolContext, RoundReport


class AsyncGossip(Protocol):
    name = "async-gossip"

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
                self.iteration = max(stamp, result.reached) + 1
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

