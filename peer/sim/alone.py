"""``peer simulate --peers 1``: the single-peer reference that a swarm's results are compared with.

One peer holds the whole training set (a partition of one is everything) and has nobody to
exchange with, so whichever ``--algorithm`` is given, a round is its local steps and nothing
else. It runs through the same ``PeerNode``, metrics and summary as a swarm: a record per round,
evaluated as ``--eval-every`` says, and no byte sent. Its local steps are the ones the
algorithm's peers take, as its trainer is built from the same settings (the run's learning-rate
schedule, or the one the algorithm sets; sharpness-aware steps where the algorithm takes them).

Not registered: it is no ``--algorithm``, only what a swarm of one peer runs.
"""

from __future__ import annotations

from gossip.message import PeerId
from gossip.protocols.base import Protocol, ProtocolContext, RoundReport, Settings

# What the result table calls such a run.
REFERENCE_LABEL = "one peer on all the training data (reference)"


class LocalTraining(Protocol):
    """Each round, the peer's local steps; no exchange, no neighbourhood, no coordinator."""

    name = "reference"
    label = REFERENCE_LABEL
    overlay = "none"
    mixes_neighbours = False

    @classmethod
    def build(cls, context: ProtocolContext, settings: Settings, *, peers: list[PeerId], joining: bool) -> LocalTraining:
        return cls(context, local_steps=settings.local_steps)

    def __init__(self, context: ProtocolContext, *, local_steps: int):
        super().__init__(context)
        self.local_steps = local_steps

    async def run(self, rounds: int, first_round: int = 0) -> None:
        learner, clock = self.context.learner, self.context.clock
        for round_ in range(first_round, rounds):
            loss = await clock.compute(learner.train, self.local_steps, steps=self.local_steps)
            out_of_time = self.context.past_deadline()
            await self.context.round_finished(
                RoundReport(round_, loss, local_steps=self.local_steps, last=out_of_time)
            )
            if out_of_time:
                return
