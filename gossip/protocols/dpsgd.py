"""D-PSGD: K local SGD steps, then gossip with the neighbours (ALGORITHMS.md section 1).

A round may gossip Q times (``gossip_steps``), each a real exchange: gossip step q of round r
is step r * Q + q, so models of different rounds and steps never mix. A neighbour that missed
one step of a round is not waited for in the round's later steps (its model is mixed if it
has arrived), so a slow or dead neighbour costs a round one timeout, not Q.
"""

from __future__ import annotations

from gossip.message import PeerId
from gossip.protocols.base import Protocol, ProtocolContext, RoundReport


class DPSGD(Protocol):
    name = "dpsgd"

    def __init__(self, context: ProtocolContext, *, local_steps: int, gossip_steps: int = 1):
        super().__init__(context)
        if gossip_steps < 1:
            raise ValueError(f"gossip steps must be at least 1, got {gossip_steps}")
        self.local_steps = local_steps
        self.gossip_steps = gossip_steps
        self.exchange = context.exchange()

    async def run(self, rounds: int, first_round: int = 0) -> None:
        learner, clock = self.context.learner, self.context.clock
        round_ = first_round
        while round_ < rounds:
            loss = await clock.compute(learner.train, self.local_steps, steps=self.local_steps)
            state = learner.state()
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
            learner.load_state(state)
            await self.context.round_finished(RoundReport(
                round_, loss, expected, heard, exchange_seconds=clock.now() - exchange_started, local_steps=self.local_steps
            ))
            # A peer that fell behind (slow, or back from a pause) has just mixed in its
            # neighbours' newer models; it goes on at their round instead of sending models
            # they would find late.
            round_ = max(round_ + 1, newest // self.gossip_steps)
