"""How the learning rate changes over a peer's local steps: a factor of the base rate per step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class CosineDecay:
    """Constant until step ``first``, then a cosine down to 0 at step ``last``."""

    first: int
    last: int

    def factor(self, step: int) -> float:
        progress = min(max(step - self.first, 0) / max(self.last - self.first, 1), 1.0)
        return 0.5 * (1 + math.cos(math.pi * progress))


class Schedule(Protocol):
    """A factor of the base rate for each local step (a protocol may bring its own, e.g. a token walk's)."""

    def factor(self, step: int) -> float: ...
