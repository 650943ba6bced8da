"""How the learning rate changes over a peer's local steps: a factor of the base rate per step."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CosineDecay:
    """Constant until step ``first``, then a cosine down to 0 at step ``last``."""

    first: int
    last: int

    def factor(self, step: int) -> float:
        progress = min(max(step - self.first, 0) / max(self.last - self.first, 1), 1.0)
        return 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class HopDecay:
    """A walking token's step size beta_n = lr (n+1)^-b at its hop n >= 1, where the holder of
    hop n takes steps (n-1) * steps_per_hop onwards (ALGORITHMS.md section 5)."""

    steps_per_hop: int
    exponent: float

    def factor(self, step: int) -> float:
        hop = step // self.steps_per_hop + 1
        return (hop + 1) ** -self.exponent


Schedule = CosineDecay | HopDecay
