"""Mixing rules: how a peer combines its own state with the states it received."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from gossip.learner import State


class MixingRule(ABC):
    spec: str  # as --mixing names it

    @abstractmethod
    def mix(self, own: State, own_weight: float, received: list[tuple[float, State]]) -> State:
        """Combine ``own`` with weighted ``received`` states into a new state.

        ``own_weight`` 0 (an aggregator's or a server's model) leaves ``own`` out of the result;
        it is still the point the result is laid out like, and the centre a robust rule trusts.
        Callers mix through ``gossip.robust.mix_screened``, which first drops absurd models.
        """


class WeightedAverage(MixingRule):
    """sum_j W_ij x_j over the models that arrived, with the weights renormalised to sum to 1.

    Renormalising keeps the result an average when a neighbour missed the round: its weight
    is spread over the models that did arrive instead of silently shrinking the model.
    """

    spec = "plain"

    def mix(self, own: State, own_weight: float, received: list[tuple[float, State]]) -> State:
        total = own_weight + sum(w for w, _ in received)
        if total <= 0:
            raise ValueError("mixing weights must sum to a positive number")
        mixed: State = {}
        for name, tensor in own.items():
            # Without weight our model has no say, even when it is not finite.
            acc = tensor * (own_weight / total) if own_weight else torch.zeros_like(tensor)
            for weight, state in received:
                acc.add_(state[name].to(device=acc.device, dtype=acc.dtype), alpha=weight / total)
            mixed[name] = acc
        return mixed


def average(states: list[State]) -> State:
    """The exact, uniform average of a list of states."""
    if not states:
        raise ValueError("cannot average an empty list of states")
    return {name: torch.stack([s[name] for s in states]).mean(dim=0) for name in states[0]}
