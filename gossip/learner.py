"""What a protocol needs from the model it trains: local steps and a model state to share."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

# The shareable part of a model: its floating-point parameters and buffers, by name.
State = dict[str, torch.Tensor]


def with_update(mixed: State, start: State, trained: State) -> State:
    """``mixed`` plus what training changed from ``start`` to ``trained``: a peer that mixed the
    model it started from adds its own update after (tensors that are not mixed, such as
    counters, are the trained ones)."""
    return {
        name: mixed[name] + (tensor - start[name]) if tensor.is_floating_point() else tensor
        for name, tensor in trained.items()
    }


def is_finite(state: State) -> bool:
    """Whether every floating-point value of a state is finite (no NaN, no infinity)."""
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


class Learner(ABC):
    @abstractmethod
    def train(self, steps: int) -> float:
        """Take ``steps`` local optimisation steps; return the mean training loss."""

    @abstractmethod
    def state(self) -> State:
        """A snapshot of the shareable state: new tensors that later training does not change."""

    @abstractmethod
    def load_state(self, state: State) -> None:
        """Replace the shareable state (e.g. with the result of mixing)."""

    def reset_optimizer(self) -> None:
        """Forget the optimiser's history (momentum): the model now comes from elsewhere, so the
        directions it built no longer apply (a token's model, which walks from peer to peer)."""

    def set_progress(self, steps: int) -> None:
        """Where the swarm is in its run, in local steps: a learner whose learning rate follows a
        schedule takes its place from this (a peer that trains only when sampled, or that joined late)."""
