"""D-PSGD: K local SGD steps, then one gossip step with the neighbours (ALGORITHMS.md section 1)."""

from __future__ import annotations

from gossip.protocols.base import Protocol, ProtocolContext, RoundReport


class DPSGD(Protocol):
    name = "dpsgd"

    def __init__(self, context: ProtocolContext, *, local_steps: int):
        super().__init__(context)
        self.local_steps = local_steps
        self.exchange = context.exchange()

    async def run(self, rounds: int, first_round: int = 0) -> None:
        learner, clock = self.context.learner, self.context.clock
        round_ = first_round
        while round_ < rounds:
            loss = await clock.compute(learner.train, self.local_steps, steps=self.local_steps)
            result = await self.exchange.step(round_, learner.state())
            learner.load_state(result.state)
            await self.context.round_finished(RoundReport(round_, loss, result.expected, result.heard))
            # A peer that fell behind (slow, or back from a pause) has just mixed in its
            # neighbours' newer models; it goes on at their round instead of sending models
            # they would find late.
            round_ = max(round_ + 1, result.newest_step)
