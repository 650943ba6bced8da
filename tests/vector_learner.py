"""A learner whose model is one vector and whose 'training' adds a fixed drift, for protocol tests.

It lets a test predict exactly what the protocol should compute (for instance W^R x0).
"""

from __future__ import annotations

import torch

from gossip.learner import Learner, State


class VectorLearner(Learner):
    def __init__(self, value: torch.Tensor, drift: float = 0.0):
        self.value = value.clone().double()
        self.drift = drift
        self.steps = 0

    def train(self, steps: int) -> float:
        self.value += self.drift * steps
        self.steps += steps
        return 0.0

    def state(self) -> State:
        return {"x": self.value.clone()}

    def load_state(self, state: State) -> None:
        self.value = state["x"].clone()
