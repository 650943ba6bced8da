"""A learner whose model is one vector and whose 'training' adds a fixed drift, for protocol tests.

It lets a test predict exactly what the protocol should compute (for instance W^R x0).
"""

from __future__ import annotations

import torch

from gossip.learner import Learner, State


class VectorLearner(Learner):
    """With ``parts`` > 1 its state is the vector cut into that many tensors, ``x0``, ``x1``, ..."""

    def __init__(self, value: torch.Tensor, drift: float = 0.0, parts: int = 1):
        self.value = value.clone().double()
        self.drift = drift
        self.parts = parts
        self.steps = 0

    def train(self, steps: int) -> float:
        self.value += self.drift * steps
        self.steps += steps
        return 0.0

    def state(self) -> State:
        if self.parts == 1:
            return {"x": self.value.clone()}
        return {f"x{i}": piece.clone() for i, piece in enumerate(self.value.chunk(self.parts))}

    def load_state(self, state: State) -> None:
        if self.parts == 1:
            self.value = state["x"].clone()
        else:
            self.value = torch.cat([state[f"x{i}"] for i in range(self.parts)])
