"""Averaging in a group: every peer that averages the same round at about the same time gets the
mean of their tensors, from the world it runs in.

This is the one collective a protocol may use besides messages (outer-optimizer training averages
its pseudo-gradients this way). Like Transport and Clock it is an interface that each world
implements: the simulator averages exactly over the live peers of a round, on its virtual
clock, and charges each peer the traffic of a ring all-reduce; real peers use hivemind's
decentralized averaging (an all-reduce in groups matched through the DHT). A peer that fails
while a group averages is left out of that group, and the others still get the mean of the rest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from gossip.learner import State
from gossip.message import PeerId


@dataclass(frozen=True)
class Averaged:
    state: State  # the mean of the group's tensors
    group: frozenset[PeerId]  # the peers whose tensors are in it, this one included


class GroupAveraging(ABC):
    """Averages a state with the peers that average the same round."""

    @abstractmethod
    async def average(self, round_: int, state: State, timeout: float) -> Averaged | None:
        """The mean of ``state`` over the peers that average ``round_`` now (names, shapes and
        dtypes as ``state``'s); None when no group formed within ``timeout`` seconds or its result
        was refused, in which case the caller goes on with its own tensors."""

    def close(self) -> None:
        """Free what the averaging holds (a process, a daemon's handlers); nothing by default."""
