"""The simulated clock: virtual time, and training whose duration comes from a speed profile."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from gossip.transport import Clock

if TYPE_CHECKING:
    from peer.sim.batched import BatchedTraining

T = TypeVar("T")


@dataclass(frozen=True)
class SpeedProfile:
    """How long this peer's hardware takes for one local optimisation step, in simulated seconds."""

    seconds_per_step: float = 0.01
    # Log-spread of each step's duration around seconds_per_step (its mean); 0: every step alike.
    jitter: float = 0.0


class SimClock(Clock):
    def __init__(self, profile: SpeedProfile | None = None, *, seed: str = "", engine: BatchedTraining | None = None):
        self.profile = profile or SpeedProfile()
        self.engine = engine  # trains the peers' models together; None: each trains alone
        self.compute_wall_seconds = 0.0  # real time spent in local work, to tell it apart from simulator overhead
        self._jitter = random.Random(f"jitter:{seed}")

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def compute(self, work: Callable[..., T], *args: Any, steps: int) -> T:
        # The work is real; the other peers do not see time pass until we charge the profile's
        # duration, which keeps the run independent of the host's speed.
        duration = self.duration(steps)
        if self.engine is not None and (trainer := self.engine.claims(work)) is not None:
            # Runs with every other peer's training asked for before this one is due to finish.
            return await self.engine.train(trainer, *args, finish_at=self.now() + duration)
        started = time.perf_counter()
        result = work(*args)
        self.compute_wall_seconds += time.perf_counter() - started
        await asyncio.sleep(duration)
        return result

    def duration(self, steps: int) -> float:
        """Simulated seconds for ``steps`` local steps; with jitter, each step's factor has mean 1."""
        spread = self.profile.jitter
        if not spread:
            return steps * self.profile.seconds_per_step
        factors = sum(math.exp(spread * self._jitter.gauss(0.0, 1.0) - spread * spread / 2) for _ in range(steps))
        return factors * self.profile.seconds_per_step
