"""Synthetic logistic regression with one part per peer, and its exact regularised optimum.

Every peer's features sit around a shift of its own and its labels follow the shared true
parameter plus a change of its own, so the peers' own optima differ: which peer a walk visits
next matters. L2 regularisation makes the optimum over all peers unique, and Newton's method
finds it to machine precision, so a run can report its squared distance to it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from peer.tasks.base import Task, TaskError

NUM_CLASSES = 2
FEATURES = 10
SAMPLES_PER_PEER = 50
TEST_SAMPLES_PER_PEER = 50
# Fixed, and independent of a run's --seed, so that runs of different seeds share the data.
GENERATOR_SEED = 5
SIGNAL = 3.0  # norm of the true weight all peers share
SHIFT_SCALE = 0.5  # typical norm of a peer's feature mean
PEER_SPREAD = 2.0  # typical norm of a peer's own change to the true weight and bias
# Chosen together: a full-gradient step stays stable on every peer's data (step x largest local
# curvature < 1), and the curvature the weight decay adds lets a step decaying as (hop + 1)^-0.9
# forget the start within 20,000 hops, so that what remains of the error is the walk's.
WEIGHT_DECAY = 0.3
LEARNING_RATE = 0.6
NEWTON_TOLERANCE = 1e-12  # gradient norm at which the optimum counts as found
NEWTON_MAX_STEPS = 50
LINE_SEARCH_HALVINGS = 50

Shards = list[tuple[torch.Tensor, torch.Tensor]]


def load_logistic(peers: int) -> Task:
    """The logistic task for `peers` peers: SAMPLES_PER_PEER training samples generated for each.

    Peer i's data depends only on i, so a larger swarm keeps the smaller swarm's parts.
    """
    if isinstance(peers, bool) or not isinstance(peers, int) or peers < 1:
        raise TaskError(f"task 'logistic' needs a whole number of peers >= 1, got {peers!r}")
    true_weight = np.random.default_rng(GENERATOR_SEED).normal(size=FEATURES)
    true_weight *= SIGNAL / np.linalg.norm(true_weight)
    parts = [_peer_data(peer, true_weight) for peer in range(peers)]
    train_x, train_y, test_x, test_y = (np.concatenate([part[k] for part in parts]) for k in range(4))
    return Task(
        name="logistic",
        train_x=torch.from_numpy(train_x.astype(np.float32)),
        train_y=torch.from_numpy(train_y),
        test_x=torch.from_numpy(test_x.astype(np.float32)),
        test_y=torch.from_numpy(test_y),
        num_classes=NUM_CLASSES,
        make_model=make_logistic_model,
        learning_rate=LEARNING_RATE,
        owners=torch.arange(peers).repeat_interleave(SAMPLES_PER_PEER),
        weight_decay=WEIGHT_DECAY,
        optimum=regularised_optimum,
    )


def _peer_data(peer: int, true_weight: np.ndarray) -> tuple[np.ndarray, ...]:
    """Training and test samples of one peer: (train_x, train_y, test_x, test_y)."""
    rng = np.random.default_rng([GENERATOR_SEED, peer])
    shift = SHIFT_SCALE * rng.normal(size=FEATURES) / math.sqrt(FEATURES)
    change = PEER_SPREAD * rng.normal(size=FEATURES + 1) / math.sqrt(FEATURES + 1)
    weight, bias = true_weight + change[:FEATURES], change[FEATURES]
    arrays = []
    for count in (SAMPLES_PER_PEER, TEST_SAMPLES_PER_PEER):
        x = shift + rng.normal(size=(count, FEATURES))
        probability = 1 / (1 + np.exp(-(x @ weight + bias)))
        arrays += [x, (rng.random(count) < probability).astype(np.int64)]
    return tuple(arrays)


def make_logistic_model() -> nn.Module:
    """Two logits of a linear map, starting at zero: every run starts from the same point, so the
    spread of its final error comes from the run alone."""
    model = nn.Linear(FEATURES, NUM_CLASSES)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    return model


def regularised_optimum(shards: Shards, weight_decay: float) -> dict[str, torch.Tensor]:
    """The exact minimiser, in float64, of the mean over shards of each shard's mean cross-entropy
    plus weight_decay / 2 times the squared norm of all parameters (as SGD's weight_decay applies it).

    Each shard weighs the same however many samples it has, as a walk with uniform visits weighs them.
    """
    if not shards:
        raise TaskError("the optimum needs at least one shard")
    if not weight_decay > 0:
        raise TaskError(f"the optimum is unique only with weight_decay > 0, got {weight_decay!r}")
    features = shards[0][0].shape[-1]
    for index, (x, y) in enumerate(shards):
        _check_shard(index, x, y, features)
    x = torch.cat([x for x, _ in shards]).to(torch.float64)
    # With a column of ones the bias is one more weight: the parameters are one matrix [weight | bias].
    inputs = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    targets = nn.functional.one_hot(torch.cat([y for _, y in shards]), NUM_CLASSES).to(torch.float64)
    # One weighted sum instead of a mean per shard: a sample of shard i weighs 1 / (shards x |shard i|).
    sizes = torch.tensor([len(y) for _, y in shards])
    sample_weight = (1 / (len(shards) * sizes.to(torch.float64))).repeat_interleave(sizes)
    objective = _RegularisedCrossEntropy(inputs, targets, sample_weight, weight_decay)
    parameters = _newton(objective, torch.zeros(NUM_CLASSES, features + 1, dtype=torch.float64))
    return {"weight": parameters[:, :features].clone(), "bias": parameters[:, features].clone()}


class _RegularisedCrossEntropy:
    """F(theta) = sum_s w_s CE(theta x_s, y_s) + lambda / 2 ||theta||^2 with its exact gradient and Hessian,
    for theta a (classes, inputs) matrix; written out because autograd's Hessian costs seconds to set up."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, sample_weight: torch.Tensor, weight_decay: float):
        self.inputs, self.targets, self.sample_weight, self.weight_decay = inputs, targets, sample_weight, weight_decay

    def gradient(self, theta: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.inputs @ theta.T, dim=1)
        return ((p - self.targets) * self.sample_weight[:, None]).T @ self.inputs + self.weight_decay * theta

    def hessian(self, theta: torch.Tensor) -> torch.Tensor:
        """d2F / dtheta[c, i] dtheta[d, j] flattened to a square matrix in theta's row-major order."""
        p = torch.softmax(self.inputs @ theta.T, dim=1)
        # A sample's softmax Jacobian is diag(p) - p p^T.
        jacobian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        weighted = self.inputs * self.sample_weight[:, None]
        hessian = torch.einsum("scd,si,sj->cidj", jacobian, weighted, self.inputs).reshape(theta.numel(), theta.numel())
        return hessian + self.weight_decay * torch.eye(theta.numel(), dtype=theta.dtype)


def _check_shard(index: int, x: torch.Tensor, y: torch.Tensor, features: int) -> None:
    if x.dim() != 2 or x.shape[1] != features or y.dim() != 1 or len(x) != len(y) or len(y) == 0:
        raise TaskError(
            f"shard {index}: needs samples x of shape (n, {features}) and n labels, n >= 1; "
            f"got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    if y.dtype != torch.int64:
        raise TaskError(f"shard {index}: labels must be int64, got {y.dtype}")
    if int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES:
        raise TaskError(f"shard {index}: labels must be 0 or 1, got [{int(y.min())}, {int(y.max())}]")
    if not bool(torch.isfinite(x).all()):
        raise TaskError(f"shard {index}: x contains NaN or infinite values")


def _newton(objective: _RegularisedCrossEntropy, theta: torch.Tensor) -> torch.Tensor:
    """Damped Newton on a smooth, strongly convex objective. A step is halved until it shrinks the
    gradient (along the Newton direction it always does, for a short enough step): far from the
    optimum a full step on cross-entropy can overshoot, and near it the objective's value is too
    flat for float64 to compare, while the gradient still is not."""
    gradient, steps = objective.gradient(theta), 0
    while float(gradient.norm()) >= NEWTON_TOLERANCE:
        if steps == NEWTON_MAX_STEPS:
            raise TaskError(
                f"the optimum was not found: gradient norm {float(gradient.norm()):.1e} after {steps} "
                f"Newton steps (needs < {NEWTON_TOLERANCE:g}); the shards may hold extreme values"
            )
        step = torch.linalg.solve(objective.hessian(theta), gradient.flatten()).view_as(theta)
        scale = 1.0
        for _ in range(LINE_SEARCH_HALVINGS):
            candidate = theta - scale * step
            candidate_gradient = objective.gradient(candidate)
            if candidate_gradient.norm() < gradient.norm():
                break
            scale /= 2
        theta, gradient, steps = candidate, candidate_gradient, steps + 1
    return theta
