"""The outer step of outer-optimizer training (docs/algorithms.md#diloco), and the error feedback of
its compressed pseudo-gradients.

A peer starts each outer round at its start point x, takes H inner steps with its own optimiser
and ends at y; its pseudo-gradient is d = x - y (the direction its inner steps went, as a
gradient points: downhill is minus). The peers combine their pseudo-gradients into an outer
gradient g, and the outer optimiser moves the start point:

    nesterov:  v <- mu v + g;   x <- x - lr (g + mu v)     (PyTorch's SGD with nesterov=True)
    sgd:       v <- mu v + g;   x <- x - lr v              (heavy ball; mu = 0 is plain SGD)

With H = 1, sgd, lr 1 and mu 0 this is synchronous training: every step's update is averaged.
"""

from __future__ import annotations

from gossip.learner import State

OUTER_OPTIMIZERS = ("nesterov", "sgd")


def floating(state: State) -> State:
    """The tensors of a state that an outer step moves (counters and other integers are not)."""
    return {name: tensor for name, tensor in state.items() if tensor.is_floating_point()}


def difference(a: State, b: State) -> State:
    """``a - b`` over the floating-point tensors of ``a``."""
    return {name: tensor - b[name] for name, tensor in floating(a).items()}


class OuterOptimizer:
    """Nesterov or heavy-ball momentum over whole states; its velocity is part of a checkpoint."""

    def __init__(self, kind: str, lr: float, momentum: float):
        if kind not in OUTER_OPTIMIZERS:
            raise ValueError(f"unknown outer optimizer {kind!r}; valid: {', '.join(OUTER_OPTIMIZERS)}")
        self.kind, self.lr, self.momentum = kind, lr, momentum
        self.velocity: State = {}

    def step(self, start: State, gradient: State) -> State:
        """The new start point: ``start`` moved by the outer ``gradient`` (tensors it lacks stay)."""
        moved = dict(start)
        for name, g in gradient.items():
            v = self.velocity.get(name)
            v = g.clone() if v is None else v.mul_(self.momentum).add_(g)
            self.velocity[name] = v
            direction = g + self.momentum * v if self.kind == "nesterov" else v
            moved[name] = start[name] - self.lr * direction
        return moved

    def load_velocity(self, velocity: State) -> None:
        self.velocity = {name: tensor.clone() for name, tensor in velocity.items()}


class ErrorFeedback:
    """What a lossy codec dropped from a pseudo-gradient, added to the next one so that it is sent
    later rather than lost: e <- e + d; send c = C(e); e <- e - c."""

    def __init__(self) -> None:
        self.residual: State = {}

    def with_residual(self, delta: State) -> State:
        return {name: d + self.residual[name] if name in self.residual else d for name, d in delta.items()}

    def keep(self, total: State, sent: State) -> None:
        """``total`` was to be sent and ``sent`` is what the others received."""
        self.residual = {name: tensor - sent[name] for name, tensor in total.items()}

    def load(self, residual: State) -> None:
        self.residual = {name: tensor.clone() for name, tensor in residual.items()}

