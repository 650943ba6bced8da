"""Variance-corrected averaging (docs/algorithms.md#variance-corrected-averaging; Tian, Al-Ars, Kitsak and Hofstee, 2024).

Averaging k weakly correlated models divides the variance of their weights by about k, which
undoes the scale that the initialisation chose and stalls training: the vanishing variance
problem of peers that start from different random models or join late. After the weighted
average, each weight tensor is rescaled around its mean to a target variance:

    w_new = (w_bar - mean(w_bar)) * sqrt((s2_target + eps) / (Var(w_bar) + eps)) + mean(w_bar)

Targets: ``others``, the mean variance of the models mixed (ours included); ``self``, our
own variance before mixing; ``conservative:C``, C times ours plus 1 - C times the mean of the
received ones. BatchNorm's running statistics and counters, and tensors of fewer than two
values, are averaged and left at that.
"""

from __future__ import annotations

import torch

from gossip.learner import State
from gossip.mixing import MixingRule, WeightedAverage

EPS = 1e-4
# State-dict names of BatchNorm buffers: statistics of activations, not weights with an init scale.
UNCORRECTED_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
TARGETS = "others, self, or conservative:C with C in [0, 1]"


def corrected(name: str, tensor: torch.Tensor) -> bool:
    return tensor.numel() > 1 and tensor.is_floating_point() and not name.endswith(UNCORRECTED_SUFFIXES)


def parse_target(spec: str) -> float | None:
    """The weight on our own variance: None for ``others``, 1 for ``self``, C for ``conservative:C``."""
    if spec == "others":
        return None
    if spec == "self":
        return 1.0
    name, _, argument = spec.partition(":")
    if name == "conservative":
        try:
            weight = float(argument)
        except ValueError:
            weight = -1.0
        if 0 <= weight <= 1:
            return weight
    raise ValueError(f"bad variance target {spec[:100]!r}; valid: {TARGETS}")


def _variance(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().float().var(correction=0)


class VarianceCorrected(MixingRule):
    def __init__(self, target: str = "others", eps: float = EPS):
        self.own_weight = parse_target(target)
        self.spec = f"variance-corrected:{target}"
        self.eps = eps
        self._average = WeightedAverage()

    def target_variance(self, name: str, own: State, received: list[tuple[float, State]]) -> torch.Tensor:
        own_variance = _variance(own[name])
        others = [_variance(state[name]).to(own_variance.device) for _, state in received]
        if self.own_weight is None:
            return torch.stack([own_variance, *others]).mean()
        if not others:
            return own_variance
        return self.own_weight * own_variance + (1 - self.own_weight) * torch.stack(others).mean()

    def mix(self, own: State, own_weight: float, received: list[tuple[float, State]]) -> State:
        mixed = self._average.mix(own, own_weight, received)
        if not received:
            return mixed
        for name, tensor in mixed.items():
            if not corrected(name, tensor):
                continue
            target = self.target_variance(name, own, received)
            mean = tensor.mean()
            scale = torch.sqrt((target + self.eps) / (_variance(tensor) + self.eps))
            mixed[name] = ((tensor - mean) * scale.to(tensor.dtype) + mean).to(tensor.dtype)
        return mixed
