"""Byzantine-robust mixing rules and the outlier guard (docs/algorithms.md#robust-mixing).

A public swarm admits peers nobody vouches for, and a model that passes validation (right
names, shapes, dtypes, finite values) may still be hostile. Two lines of defence:

- The outlier guard, which every protocol applies whatever its rule: a model that is wildly
  far from ours, both against the other models of the step and against the size of our own
  model, is not mixed at all. It is meant for absurd models (1e30 in every weight), which no
  averaging survives, and is loose enough never to drop an honest one.
- The robust rules, chosen with ``--mixing``, which bound what a hostile model that looks
  plausible can do: self-centred clipping (ClippedGossip), coordinate-wise trimmed mean and
  coordinate-wise median.

Distances and norms are L2 over all the floating-point tensors of a model together, in
float64 so that a huge model gives a huge distance rather than an overflow.
"""

from __future__ import annotations

import logging
import math
import re

import torch

from gossip.learner import State
from gossip.message import PeerId
from gossip.mixing import MixingRule
from gossip.transport import Transport

log = logging.getLogger(__name__)

# A received model is an outlier when its distance from ours is more than OUTLIER_SPREAD times
# the median distance of the models in play this step and more than OUTLIER_SIZE times the size
# of our model. Both must hold: the first keeps models that agree with the others when ours is
# the odd one out (a peer that joined with its own initial model); the second keeps a model
# that is far from its fellows but not absurd for a model of this size (two halves of a swarm
# that drifted apart, the first rounds of independently initialised peers, where distances are
# about 1.4 times a model's norm). The second alone catches a sender that is our only neighbour.
OUTLIER_SPREAD = 10.0
OUTLIER_SIZE = 100.0

ROBUST_SPECS = "clipped[:TAU], trimmed-mean:B or median"


def norm(state: State) -> float:
    """||x|| over the floating-point tensors of a state."""
    return math.sqrt(sum(
        float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in state.values() if t.is_floating_point()
    ))


def distance(a: State, b: State) -> float:
    """||b - a|| over the floating-point tensors of ``a``; inf when the difference overflows the
    models' dtype (which makes the model an outlier whatever the bound). The difference is taken
    in that dtype and only its norm in float64: this runs for every model received, so one
    temporary per tensor, not three."""
    total = 0.0
    for name, tensor in a.items():
        if tensor.is_floating_point():
            difference = b[name].to(tensor) - tensor
            total += float(torch.linalg.vector_norm(difference, dtype=torch.float64)) ** 2
    return math.sqrt(total)


def model_scale(state: State) -> float:
    """The size of a model, for the guard: its norm, and never less than that of a model whose
    values are all 1 (a model at zero, as a toy learner may start, still has a scale)."""
    size = sum(t.numel() for t in state.values() if t.is_floating_point())
    return max(norm(state), math.sqrt(size))


def outliers(distances: dict[PeerId, float], scale: float) -> dict[PeerId, float]:
    """The senders whose distance from us the guard refuses, with the bound each one broke.

    For sender j, the models in play are ours (distance 0) and the others of the step; their
    lower median is what j is compared with, so ours stands in for an honest voter and two
    senders of the same absurd model do not vouch for each other.
    """
    refused: dict[PeerId, float] = {}
    for sender, far in distances.items():
        in_play = sorted([0.0, *(d for other, d in distances.items() if other != sender)])
        median = in_play[(len(in_play) - 1) // 2]
        bound = max(OUTLIER_SPREAD * median, OUTLIER_SIZE * scale)
        if far > bound:
            refused[sender] = bound
    return refused


def screen(
    transport: Transport, own: State, received: dict[PeerId, tuple[float, State]], step: int
) -> dict[PeerId, tuple[float, State]]:
    """The received (weight, state) pairs that the outlier guard lets through, in the given order;
    each one it stops is counted as an ``outlier`` rejection and logged."""
    distances = {sender: distance(own, state) for sender, (_, state) in received.items()}
    refused = outliers(distances, model_scale(own))
    for sender, bound in refused.items():
        transport.counters.reject("outlier")
        log.warning(
            "%s: left out the model of %s at step %d: its distance from ours, %.3g, is over %.3g",
            transport.peer_id, sender, step, distances[sender], bound,
        )
    return {sender: pair for sender, pair in received.items() if sender not in refused}


def mix_screened(
    rule: MixingRule, transport: Transport, own: State, own_weight: float,
    received: dict[PeerId, tuple[float, State]], step: int,
) -> State:
    """``rule`` over our model and the received models that pass the guard. With nothing left to
    mix and no weight on our model (an aggregator that did not train), our model stays as it is."""
    kept = screen(transport, own, received, step)
    if not kept and own_weight == 0:
        return {name: tensor.clone() for name, tensor in own.items()}
    return rule.mix(own, own_weight, list(kept.values()))


def _total_weight(own_weight: float, received: list[tuple[float, State]]) -> float:
    total = own_weight + sum(w for w, _ in received)
    if total <= 0:
        raise ValueError("mixing weights must sum to a positive number")
    return total


def adaptive_radius(distances: list[float]) -> float:
    """The distance of the ceil(n/2)-th closest of n neighbours.

    Counting our own model (distance 0) as one more voter, the models within this radius are a
    strict majority of those mixed. So while fewer than half of them are an attacker's, the
    radius is at most the distance of an honest neighbour, and an attacker moves us no further
    than an honest neighbour can; at most floor(n/2) neighbours are clipped. With one neighbour
    nothing is clipped: there is no majority to tell it from (the guard still stops absurd models).
    """
    ranked = sorted(distances)
    return ranked[math.ceil(len(ranked) / 2) - 1]


class SelfCentredClipping(MixingRule):
    """x_i <- sum_j W_ij (x_i + clip(x_j - x_i, tau)), clip(v, tau) = v * min(1, tau / ||v||)
    (ClippedGossip; He, Karimireddy and Jaggi, arXiv 2202.01545), with the weights renormalised
    over the models that arrived. ``radius`` None: tau adapts each step (``adaptive_radius``).

    Within tau of us a neighbour counts in full, so with every neighbour within tau this is the
    weighted average; beyond it, a neighbour pulls us towards it by tau at most, whatever it sent.
    """

    def __init__(self, radius: float | None = None):
        if radius is not None and not (0 < radius < math.inf):
            raise ValueError(f"the clipping radius must be a positive number, got {radius}")
        self.radius = radius
        self.spec = "clipped" if radius is None else f"clipped:{radius:g}"

    def mix(self, own: State, own_weight: float, received: list[tuple[float, State]]) -> State:
        total = _total_weight(own_weight, received)
        mixed = {name: tensor.clone() for name, tensor in own.items()}
        if not received:
            return mixed
        distances = [distance(own, state) for _, state in received]
        tau = self.radius if self.radius is not None else adaptive_radius(distances)
        for (weight, state), far in zip(received, distances):
            shrink = min(1.0, tau / far) if far > 0 else 1.0
            for name, tensor in mixed.items():
                tensor.add_(state[name].to(tensor) - own[name], alpha=weight / total * shrink)
        return mixed


def _models(own: State, own_weight: float, received: list[tuple[float, State]]) -> list[State]:
    """The models a coordinate-wise rule ranks: ours unless it has no weight (an aggregator that
    did not train), and each received one once; the rank of a value, not its weight, counts."""
    models = ([own] if own_weight > 0 else []) + [state for _, state in received]
    if not models:
        raise ValueError("no models to mix")
    return models


def _sorted_values(name: str, reference: torch.Tensor, models: list[State]) -> torch.Tensor:
    return torch.stack([model[name].to(reference) for model in models]).sort(dim=0).values


def _median(ranked: torch.Tensor) -> torch.Tensor:
    """The median along the first dimension of sorted values: the middle one, or the mean of the two middle ones."""
    n = ranked.shape[0]
    if n % 2:
        return ranked[n // 2].clone()
    return (ranked[n // 2 - 1] + ranked[n // 2]) / 2


class TrimmedMean(MixingRule):
    """Per coordinate, drop the ``trim`` largest and ``trim`` smallest values among our model and
    the received ones, and average the rest. With fewer than 2 * trim + 1 models there would be
    nothing left, so the rule falls back to their median, the most it can trim."""

    def __init__(self, trim: int):
        if trim < 1:
            raise ValueError(f"trimmed mean drops at least 1 value from each end, got {trim}")
        self.trim = trim
        self.spec = f"trimmed-mean:{trim}"

    def mix(self, own: State, own_weight: float, received: list[tuple[float, State]]) -> State:
        models = _models(own, own_weight, received)
        n = len(models)
        mixed: State = {}
        for name, tensor in own.items():
            ranked = _sorted_values(name, tensor, models)
            mixed[name] = ranked[self.trim : n - self.trim].mean(dim=0) if n > 2 * self.trim else _median(ranked)
        return mixed


class CoordinateMedian(MixingRule):
    """Per coordinate, the median of our model and the received ones (the mean of the two middle
    values for an even count)."""

    spec = "median"

    def mix(self, own: State, own_weight: float, received: list[tuple[float, State]]) -> State:
        models = _models(own, own_weight, received)
        return {name: _median(_sorted_values(name, tensor, models)) for name, tensor in own.items()}


def parse_robust(spec: str) -> MixingRule | None:
    """The robust rule ``spec`` names; None when it names none; ValueError, saying what is wrong,
    when it names one with a bad argument."""
    name, has_argument, argument = spec.partition(":")
    shown = spec[:100]
    if name == "clipped":
        if not has_argument:
            return SelfCentredClipping()
        try:
            radius = float(argument)
        except ValueError:
            radius = math.nan
        if not 0 < radius < math.inf:
            raise ValueError(f"bad mixing {shown!r}: the clipping radius TAU must be a positive number, e.g. clipped:5")
        return SelfCentredClipping(radius)
    if name == "trimmed-mean":
        if not re.fullmatch(r"[0-9]{1,9}", argument) or int(argument) < 1:
            raise ValueError(
                f"bad mixing {shown!r}: B, the values dropped from each end, must be a whole number of at least 1, "
                "e.g. trimmed-mean:1"
            )
        return TrimmedMean(int(argument))
    if name == "median":
        if has_argument:
            raise ValueError(f"bad mixing {shown!r}: median takes no argument")
        return CoordinateMedian()
    return None
