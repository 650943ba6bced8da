"""Local training and evaluation of one peer's model: SGD with momentum, or AdamW, on the peer's own data.

The model never stays NaN or infinite: a copy of the last finite state is kept after every
training and every load (the models are small), and a step that breaks the model puts it back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gossip.learner import Learner, State, is_finite
from peer.config import TrainingConfig
from peer.errors import ConfigError
from peer.lr_schedule import Schedule
from peer.tasks import Task
from peer.tasks.augment import Augmentation

log = logging.getLogger(__name__)

# Small enough that activations stay in the allocator cache instead of being mapped and unmapped per batch.
EVAL_BATCH = 256
# AdamW's moment decay rates: nanoGPT's for small character models, where 0.999 reacts too slowly.
ADAMW_BETAS = (0.9, 0.99)
# What each optimiser keeps per parameter, and the name it has in a saved training state.
OPTIMIZER_STATE = {"sgd": {"momentum_buffer": "momentum"}, "adamw": {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "step": "step"}}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when it is available; asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but this torch build sees no CUDA device; use --device auto or cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def sam_perturbation(gradients: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """rho * g / ||g||, with one L2 norm over all the gradients; zero where the gradient is zero."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gradients]))
    return [g * (rho / (norm + 1e-12)) for g in gradients]


def label_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each label: y is one label per sample, or one per position of each sample."""
    return F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="none").view(y.shape)


def make_optimizer(
    kind: str, parameters: list[torch.nn.Parameter], *, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, betas=ADAMW_BETAS, weight_decay=weight_decay)
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)


@torch.no_grad()
def test_counts(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """How many of y's labels ``model`` predicts right on x, and its summed loss on them."""
    correct = torch.zeros((), device=y.device)
    loss = torch.zeros((), device=y.device)
    for start in range(0, len(y), EVAL_BATCH):
        logits = model(x[start : start + EVAL_BATCH])
        labels = y[start : start + EVAL_BATCH]
        loss += label_losses(logits, labels).sum()
        correct += (logits.argmax(dim=-1) == labels).sum()
    return correct, loss


class Trainer(Learner):
    def __init__(
        self,
        model: nn.Module,
        train: tuple[torch.Tensor, torch.Tensor],
        test: tuple[torch.Tensor, torch.Tensor],
        *,
        lr: float,
        momentum: float,
        weight_decay: float,
        batch_size: int,
        seed: int,
        device: torch.device,
        schedule: Schedule | None = None,
        sam_rho: float = 0.0,
        optimum: State | None = None,
        optimizer: str = "sgd",
        augmentation: Augmentation | None = None,
    ):
        self.device = device
        self.model = model.to(device)
        self.train_x, self.train_y = (t.to(device) for t in train)
        self.test_x, self.test_y = (t.to(device) for t in test)
        self.batch_size = min(batch_size, len(self.train_y))
        self.lr = lr
        self.schedule = schedule  # None: a constant rate
        # The exact minimiser of the task's objective on this run's split, where the task has one.
        self.optimum = {name: t.to(device, torch.float64) for name, t in optimum.items()} if optimum else None
        self.sam_rho = sam_rho  # > 0: sharpness-aware steps (SAM) with this radius
        self.optimizer_kind = optimizer
        self.optimizer = make_optimizer(
            optimizer, list(self.model.parameters()), lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        self.augmentation = augmentation
        self._generator = torch.Generator().manual_seed(seed)
        # Its own generator, so that augmenting or not draws the same batches.
        self._augment_generator = torch.Generator().manual_seed(seed + 1)
        self._order = torch.empty(0, dtype=torch.long)
        self._position = 0
        self.steps_taken = 0
        self.rollbacks = 0  # times the model was put back to its last finite state
        self._remember_finite()

    def next_rows(self) -> torch.Tensor | None:
        """The rows of the peer's data that its next step trains on; None: all of them (full-batch steps)."""
        if self.batch_size == len(self.train_y):  # full-batch steps: the order does not matter
            return None
        # Epochs of sampling without replacement; a new permutation when the current one runs out.
        if self._position + self.batch_size > len(self._order):
            self._order = torch.randperm(len(self.train_y), generator=self._generator).to(self.device)
            self._position = 0
        index = self._order[self._position : self._position + self.batch_size]
        self._position += self.batch_size
        return index

    def augmentation_draw(self, count: int) -> torch.Tensor | None:
        """The random numbers that change the next ``count`` training samples; None without augmentation."""
        return None if self.augmentation is None else self.augmentation.draw(count, self._augment_generator)

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.next_rows()
        x, y = (self.train_x, self.train_y) if rows is None else (self.train_x[rows], self.train_y[rows])
        drawn = self.augmentation_draw(len(x))
        return (x if drawn is None else self.augmentation.apply(x, drawn)), y

    def train(self, steps: int) -> float:
        self.model.train()
        total = torch.zeros((), device=self.device)
        for _ in range(steps):
            if self.schedule:
                self._set_lr(self.lr * self.schedule.factor(self.steps_taken))
            x, y = self._next_batch()
            loss = label_losses(self.model(x), y).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.sam_rho:
                self._sharpness_aware_gradient(x, y)
            self.optimizer.step()
            total += loss.detach()
            self.steps_taken += 1
        self._keep_or_roll_back()
        return float(total) / max(steps, 1)

    def _keep_or_roll_back(self) -> None:
        """Keep the trained model as the last finite one, or put the last finite one back."""
        trained = self.state()
        if is_finite(trained):
            self._last_finite = trained
            return
        self.note_rollback()
        self._copy_in(self._last_finite)
        # Momentum built from non-finite gradients would bring the NaN straight back.
        self.optimizer.state.clear()

    def note_rollback(self) -> None:
        self.rollbacks += 1
        log.warning(
            "training made the model NaN or infinite (is --lr too high?); rolled back to its last finite state "
            "(%d rollbacks so far)", self.rollbacks,
        )

    def _sharpness_aware_gradient(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Replace the gradient by the one at the worst point within sam_rho (same batch), as SAM does."""
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        deltas = sam_perturbation([p.grad for p in parameters], self.sam_rho)
        with torch.no_grad():
            for parameter, delta in zip(parameters, deltas):
                parameter.add_(delta)
        self.optimizer.zero_grad(set_to_none=True)
        label_losses(self.model(x), y).mean().backward()
        with torch.no_grad():
            for parameter, delta in zip(parameters, deltas):
                parameter.sub_(delta)

    def set_progress(self, steps: int) -> None:
        self.steps_taken = steps

    def training_state(self) -> dict[str, torch.Tensor]:
        """What training goes on from besides the model: the optimiser's state (momentum, or AdamW's
        moments and step), the batch order and the place in it, the generators of the next orders and
        augmentations, the steps taken (the schedule's position) and rollbacks."""
        tensors = {
            f"{saved}.{index}": state[key].detach().clone()
            for index, p in enumerate(self.model.parameters())
            for key, saved in OPTIMIZER_STATE[self.optimizer_kind].items()
            if (state := self.optimizer.state.get(p, {})).get(key) is not None
        }
        tensors["batch_order"] = self._order.cpu()
        tensors["generator"] = self._generator.get_state()
        tensors["augment_generator"] = self._augment_generator.get_state()
        tensors["counters"] = torch.tensor([self.steps_taken, self._position, self.rollbacks])
        return tensors

    def load_training_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Go on from ``training_state()``; ValueError, with nothing changed, when it does not fit this trainer."""
        optimizer_state = self._checked_optimizer_state(tensors)
        order, counters, state = tensors.get("batch_order"), tensors.get("counters"), tensors.get("generator")
        if counters is None or counters.shape != (3,) or counters.dtype != torch.long or bool((counters < 0).any()):
            raise ValueError("the step counters are missing or damaged")
        steps, position, rollbacks = (int(c) for c in counters)
        rows = len(self.train_y)
        if (
            order is None or order.dim() != 1 or order.dtype != torch.long or position > len(order)
            or (len(order) and not (0 <= int(order.min()) and int(order.max()) < rows))
        ):
            raise ValueError("the batch order is missing, or does not fit this peer's data (another --shard?)")
        generator = _generator_from(state, "batch")
        # A state saved before augmentations were kept goes on with a fresh one.
        saved_augment = tensors.get("augment_generator")
        augment_generator = self._augment_generator if saved_augment is None else _generator_from(saved_augment, "augmentation")
        self.optimizer.state.clear()
        for parameter, entries in optimizer_state.items():
            self.optimizer.state[parameter] = entries
        self._generator, self._order, self._position = generator, order.to(self.device), position
        self._augment_generator = augment_generator
        self.steps_taken, self.rollbacks = steps, rollbacks

    def _checked_optimizer_state(self, tensors: dict[str, torch.Tensor]) -> dict[torch.nn.Parameter, dict[str, torch.Tensor]]:
        """The optimiser's state in ``tensors``, per parameter; ValueError when it does not fit this model
        and optimiser."""
        parameters = list(self.model.parameters())
        keys = {saved: key for key, saved in OPTIMIZER_STATE[self.optimizer_kind].items()}
        every_key = {saved for kind in OPTIMIZER_STATE.values() for saved in kind.values()}
        found: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            saved, _, index = name.partition(".")
            if saved not in every_key:
                continue
            if saved not in keys:
                raise ValueError(f"{name!r} belongs to another optimiser than {self.optimizer_kind} (was --optimizer changed?)")
            if not index.isdigit() or int(index) >= len(parameters):
                raise ValueError(f"{saved} for a parameter the model does not have ({name!r})")
            parameter = parameters[int(index)]
            shape = () if saved == "step" else parameter.shape
            if tensor.shape != shape or not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{saved} {name!r} does not fit the model, or is not finite")
            found.setdefault(parameter, {})[keys[saved]] = tensor.to(self.device if saved != "step" else "cpu").clone()
        return found

    def reset_optimizer(self) -> None:
        self.optimizer.state.clear()

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def evaluate(self) -> tuple[float, float]:
        """Accuracy and mean loss on the held-out test set (per label)."""
        self.model.eval()
        correct, loss = test_counts(self.model, self.test_x, self.test_y)
        n = self.test_y.numel()
        return float(correct) / n, float(loss) / n

    @torch.no_grad()
    def squared_error(self) -> float | None:
        """||theta - theta*||^2 against the task's exact optimum; None for a task without one."""
        if self.optimum is None:
            return None
        own = self.model.state_dict()
        return float(sum(((own[name].double() - best) ** 2).sum() for name, best in self.optimum.items()))

    def state(self) -> State:
        return {name: t.detach().clone() for name, t in self.model.state_dict().items() if t.is_floating_point()}

    def load_state(self, state: State) -> None:
        """Load ``state``; one that is NaN or infinite (mixing overflowed) is refused, and the model
        stays at its last finite state."""
        if not is_finite(state):
            self.rollbacks += 1
            log.warning(
                "refused to load a NaN or infinite model (mixing overflowed); kept the last finite state "
                "(%d rollbacks so far)", self.rollbacks,
            )
            return
        self._copy_in(state)
        self._remember_finite()

    def _remember_finite(self) -> None:
        self._last_finite = self.state()

    @torch.no_grad()
    def _copy_in(self, state: State) -> None:
        own = self.model.state_dict()
        for name, tensor in state.items():
            own[name].copy_(tensor)


def _generator_from(state: torch.Tensor | None, what: str) -> torch.Generator:
    generator = torch.Generator()
    try:
        generator.set_state(state)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"the {what} generator's state is damaged ({error})") from None
    return generator


def weight_decay(config: TrainingConfig, task: Task) -> float:
    """--weight-decay, or the task's own when it is not given."""
    return task.weight_decay if config.weight_decay is None else config.weight_decay


def split_optimum(config: TrainingConfig, task: Task, shards: list[np.ndarray]) -> State | None:
    """The exact minimiser of the task's objective on this split of its data, for a task that has
    one (a convex one); None otherwise."""
    if task.optimum is None:
        return None
    return task.optimum([(task.train_x[shard], task.train_y[shard]) for shard in shards], weight_decay(config, task))


def peer_trainer(
    config: TrainingConfig, task: Task, shard: np.ndarray, index: int, device: torch.device, optimum: State | None = None,
    trainer_class: type[Trainer] = Trainer, test: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Trainer:
    """Peer ``index``'s trainer: its part of the training set and the run's settings; ``test``: the
    run's evaluation set (``evaluation_set``), given to share one copy among many peers.

    With --init same the model is drawn from --seed, so every peer of a run (simulated or real)
    starts from the same one; with --init independent each peer draws its own. The batch order
    is the peer's own.
    """
    torch.manual_seed(config.seed if config.init == "same" else config.seed * 100_003 + index + 1)
    rows = torch.as_tensor(shard, dtype=torch.long)
    return trainer_class(
        task.make_model(),
        (task.train_x[rows], task.train_y[rows]),
        test or evaluation_set(config, task),
        lr=config.lr or task.learning_rate,
        momentum=config.momentum,
        weight_decay=weight_decay(config, task),
        batch_size=config.batch_size,
        seed=config.seed * 100_003 + index,
        device=device,
        schedule=config.schedule,
        sam_rho=config.sharpness_radius(),
        optimum=optimum,
        optimizer=config.optimizer or task.optimizer,
        augmentation=task.augmentation,
    )


def evaluation_set(config: TrainingConfig, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """The test samples the run evaluates on: all, or the fixed --eval-samples of them."""
    tested = evaluation_rows(len(task.test_y), config.eval_samples, config.seed)
    return (task.test_x, task.test_y) if tested is None else (task.test_x[tested], task.test_y[tested])


def evaluation_rows(test_samples: int, wanted: int | None, seed: int) -> torch.Tensor | None:
    """The fixed test samples that --eval-samples evaluates on, the same for every peer of a run; None: all."""
    if wanted is None or wanted >= test_samples:
        return None
    chosen = torch.randperm(test_samples, generator=torch.Generator().manual_seed(seed))[:wanted]
    return chosen.sort().values
