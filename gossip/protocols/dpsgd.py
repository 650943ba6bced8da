"""D-PSGD: K local SGD steps, then gossip with the neighbours (docs/algorithms.md#d-psgd).

A round may gossip Q times (``gossip_steps``), each a real exchange: gossip step q of round r
is step r * Q + q, so models of different rounds and steps never mix. A neighbour that missed
one step of a round is not waited for in the round's later steps (its model is mixed if it
has arrived), so a slow or dead neighbour costs a round one timeout, not Q.

By default a peer mixes the models its neighbours have just trained, x <- W (x + update). With
``mix_start`` it mixes the models the peers started the round from and adds its own update
after, x <- W x + update (the form of Lian et al., 2017, and the order that gossip without
rounds must use: ``async_gossip``).

A peer that joins says hello to its neighbours and starts from the model and round of the first
that answers; a peer that leaves says goodbye (``gossip.greeting``).

Neighbours whose rounds drifted apart, however far (a partition, a long pause, a slow peer),
meet again: the one behind mixes the newer model it is sent and moves on to its round, while
the one ahead drops the older models as late until then. A jump goes to the round that at least
half of the neighbours have reached (so one lying neighbour among honest ones moves nobody),
never further than a round whose model was mixed, and never past the run: models claiming a
step beyond it are refused.
"""

from __future__ import annotations

from gossip.greeting import Greeting
from gossip.learner import with_update
from gossip.message import PeerId
from gossip.protocols.base import Protocol, ProtocolContext, RoundReport, Settings

# Settings of gossip on a topology with rounds, which D-PSGD and what derives from it take.
ROUND_GOSSIP_SETTINGS = {
    "topology": "", "weights": "", "gossip_steps": "", "mix_point": "", "error_feedback": "", "consensus_step": "",
    "duration": "",
}


class DPSGD(Protocol):
    name = "dpsgd"
    label = "D-PSGD (decentralised gossip)"
    family = "gossip"
    takes = ROUND_GOSSIP_SETTINGS
    pulls = True
    attackers = True

    @classmethod
    def build(cls, context: ProtocolContext, settings: Settings, *, peers: list[PeerId], joining: bool) -> DPSGD:
        return cls(
            context, local_steps=settings.local_steps, gossip_steps=settings.gossip_steps, joining=joining,
            mix_start=settings.mix_point == "start",
        )

    @classmethod
    def check(cls, settings: Settings) -> None:
        if settings.given("consensus_step") and settings.gossip.error_feedback == "none":
            raise ValueError(
                "--consensus-step is CHOCO's step, which only error feedback takes; give a lossy --codec "
                "(or --error-feedback choco), or leave it out"
            )

    def __init__(
        self, context: ProtocolContext, *, local_steps: int, gossip_steps: int = 1, joining: bool = False,
        mix_start: bool = False,
    ):
        super().__init__(context)
        if gossip_steps < 1:
            raise ValueError(f"gossip steps must be at least 1, got {gossip_steps}")
        self.local_steps = local_steps
        self.gossip_steps = gossip_steps
        self.joining = joining
        self.mix_start = mix_start
        self.exchange = context.exchange()
        self.round = 0
        self.greeting = Greeting(context, lambda: self.round)

    async def run(self, rounds: int, first_round: int = 0) -> None:
        learner, clock = self.context.learner, self.context.clock
        self.exchange.set_run_length(rounds * self.gossip_steps)
        round_ = first_round
        if self.joining:
            round_ = max(first_round, await self.greeting.join())
            learner.set_progress(round_ * self.local_steps)
        while round_ < rounds:
            self.round = round_
            start = learner.state() if self.mix_start else {}
            loss = await clock.compute(learner.train, self.local_steps, steps=self.local_steps)
            trained = learner.state()
            state = start if self.mix_start else trained
            expected = heard = newest = 0
            absent: frozenset[PeerId] = frozenset()
            exchange_started = clock.now()
            for q in range(self.gossip_steps):
                result = await self.exchange.step(round_ * self.gossip_steps + q, state, absent)
                state = result.state
                absent |= result.missing
                expected += len(result.expected)
                heard += result.heard
                newest = max(newest, result.newest_step)
            learner.load_state(with_update(state, start, trained) if self.mix_start else state)
            out_of_time = self.context.past_deadline()
            await self.context.round_finished(RoundReport(
                round_, loss, expected, heard, exchange_seconds=clock.now() - exchange_started,
                local_steps=self.local_steps, last=out_of_time,
            ))
            if out_of_time:
                return
            # A peer that fell behind (slow, back from a pause, or cut off) has just mixed in its
            # neighbours' newer models; it goes on at their round, on their learning-rate
            # schedule, instead of sending models they would find late.
            next_round = max(round_ + 1, newest // self.gossip_steps)
            if next_round > round_ + 1:
                learner.set_progress(next_round * self.local_steps)
            round_ = next_round

    async def leave(self) -> None:
        await self.greeting.leave()
