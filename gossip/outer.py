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


def split_fragments(state: State, count: int) -> tuple[tuple[str, ...], ...]:
    """The names of ``state``'s tensors in ``count`` fragments of consecutive tensors (layer order),
    each about as large as the others: a fragment ends once it reaches its share of the total, or
    when the tensors left are just enough to give every later fragment one."""
    names = list(state)
    if not 1 <= count <= len(names):
        raise ValueError(f"{count} fragments need between 1 and {len(names)} (the model's tensors), got {count}")
    total = sum(state[name].numel() for name in names)
    fragments: list[tuple[str, ...]] = []
    current: list[str] = []
    filled = 0
    for index, name in enumerate(names):
        current.append(name)
        filled += state[name].numel()
        later = count - len(fragments) - 1  # fragments still to start after this one
        left = len(names) - index - 1
        if later and (filled * count >= total * (len(fragments) + 1) or left == later):
            fragments.append(tuple(current))
            current = []
    fragments.append(tuple(current))
    return tuple(fragments)


def subset(state: State, names: tuple[str, ...]) -> State:
    return {name: state[name] for name in names}


FEEDBACK_HELP = "none, residual or residual:BETA (BETA in [0, 1]: the share of the residual carried over)"


class ErrorFeedback:
    """What a lossy codec dropped from a pseudo-gradient, added to the next one so that it is sent
    later rather than lost: e <- beta e + d; send c = C(e); e <- e - c.

    ``beta`` 1 keeps all of it (classic error feedback); below 1 the residual decays, which makes it
    an accumulator of past pseudo-gradients, as SparseLoCo uses one in place of outer momentum; 0
    drops what the codec left out (no feedback). Tensors are kept by name, so that fragments of a
    model (each sent in its own rounds) keep residuals of their own.
    """

    def __init__(self, beta: float = 1.0) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"error feedback BETA must be in [0, 1], got {beta:g}")
        self.beta = beta
        self.residual: State = {}
        self.unsent: State = {}  # pseudo-gradients of a round whose combination failed

    @classmethod
    def parse(cls, spec: str) -> ErrorFeedback:
        if spec == "none":
            return cls(0.0)
        kind, has_beta, beta = spec.partition(":")
        if kind == "residual" and not has_beta:
            return cls()
        try:
            if kind == "residual":
                return cls(float(beta))
        except ValueError:
            pass
        raise ValueError(f"bad error feedback {spec[:40]!r}; valid: {FEEDBACK_HELP}")

    def with_residual(self, delta: State) -> State:
        """What to send instead of ``delta``: it plus the residual (and whatever a failed round held back)."""
        total = {}
        for name, d in delta.items():
            if self.beta and name in self.residual:
                d = d + self.beta * self.residual[name]
            total[name] = d + self.unsent.pop(name) if name in self.unsent else d
        return total

    def keep(self, total: State, sent: State) -> None:
        """``total`` was to be sent and ``sent`` is what the others received."""
        if self.beta:
            self.residual.update({name: tensor - sent[name] for name, tensor in total.items()})

    def hold(self, total: State) -> None:
        """Nothing was sent: all of ``total`` goes with the next pseudo-gradient of its tensors, whatever BETA."""
        self.unsent.update(total)
        for name in total:
            self.residual.pop(name, None)

    def load(self, residual: State, unsent: State) -> None:
        self.residual = {name: tensor.clone() for name, tensor in residual.items()}
        self.unsent = {name: tensor.clone() for name, tensor in unsent.items()}
