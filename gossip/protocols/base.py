"""The small base every protocol extends: it gets a context and runs rounds."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gossip.exchange import Exchange
from gossip.learner import Learner
from gossip.neighbourhood import Neighbourhood
from gossip.settings import GossipSettings
from gossip.transport import Clock, Transport
from gossip.wait_free import WaitFreeExchange


@dataclass(frozen=True)
class RoundReport:
    round: int
    train_loss: float
    neighbours_expected: int = 0
    neighbours_heard: int = 0
    exchange_seconds: float = 0.0  # time spent exchanging models this round (clock seconds)
    local_steps: int = 0  # optimisation steps taken this round
    span: int = 1  # rounds this report completes: more than one when the peer jumped ahead to its neighbours'
    last: bool = False  # the peer's last round (the run's end, or its --duration ran out)


@dataclass
class ProtocolContext:
    """Everything a protocol may touch. It never sees whether the world is simulated."""

    transport: Transport
    clock: Clock
    learner: Learner
    neighbourhood: Neighbourhood | None
    # Awaited after every round, once the round's model is final (the runtime evaluates and records it).
    round_finished: Callable[[RoundReport], Awaitable[None]]
    gossip: GossipSettings = field(default_factory=GossipSettings)
    deadline: float | None = None  # clock seconds after which no round starts (None: rounds only)

    def past_deadline(self) -> bool:
        return self.deadline is not None and self.clock.now() >= self.deadline

    def exchange(self) -> Exchange:
        """A gossip step with the neighbourhood, as ``gossip`` configures it."""
        if self.neighbourhood is None:
            raise ValueError("gossip needs a neighbourhood")
        return self.gossip.exchange(self.transport, self.clock, self.neighbourhood, self.learner.state())

    def wait_free_exchange(self) -> WaitFreeExchange:
        """Gossip without rounds, as ``gossip`` configures it (``gossip.wait_free``)."""
        if self.neighbourhood is None:
            raise ValueError("gossip needs a neighbourhood")
        return self.gossip.wait_free_exchange(self.transport, self.clock, self.neighbourhood, self.learner.state())


class Protocol(ABC):
    name: str

    def __init__(self, context: ProtocolContext):
        self.context = context

    @abstractmethod
    async def run(self, rounds: int, first_round: int = 0) -> None:
        """Run rounds ``first_round`` .. ``rounds - 1``, reporting each through ``context.round_finished``.

        A peer that joins a running swarm starts at the swarm's round (see ``gossip.catchup``).
        """

    async def leave(self) -> None:
        """Tell the others this peer is going, before it stops (a protocol with no goodbye just stops)."""

    def save_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What a restarted peer needs of this protocol besides its model and round (tensors, and
        JSON-able values), for its checkpoint. Nothing by default: what a protocol holds of its
        neighbours is out of date by the time a killed peer is back, and each protocol already
        renews it for a peer that joins (error-feedback links resync with a full copy, a token
        that went quiet is re-issued by its previous holder)."""
        return {}, {}

    def restore_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Go on from ``save_state()``, before ``run``; ValueError, with nothing changed, when it does not fit."""
        if tensors or meta:
            raise ValueError(f"{self.name} keeps no state in a checkpoint, and this one holds some")
