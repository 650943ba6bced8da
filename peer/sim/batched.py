"""Many simulated peers' local training as one vectorised step.

The models of the peers are rows of stacked tensors, and each peer's trainer works on its own
row (its module's parameters are views of it), so all a protocol does with one peer's model is
unchanged. Training asked for through the simulated clock does not run at once: the requests
made before the earliest of them is due to finish run together, each local step one vmapped
forward and backward pass over the stack, and every peer resumes when its own training would
have ended. Each peer keeps its own batch order, augmentations, learning-rate schedule position,
optimiser state (SGD's momentum, or AdamW's moments and step count), SAM perturbation and
rollback to its last finite model; only the arithmetic is shared.
"""

from __future__ import annotations

import asyncio
import copy
import math
import queue
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from peer.errors import ConfigError
from peer.trainer import Trainer, label_losses, test_counts

# Peers per vmapped pass. For the default model at 1,000 peers, 64 to 256 ran within the noise of each other
# and 32 or 1,024 slower (scripts/bench_simulation_scale.py); the smaller chunk holds less memory.
CHUNK_PEERS = 64


class BatchingError(ConfigError):
    """A model that the batched engine cannot train, with the reason."""


def batching_refusal(model: nn.Module, sample: torch.Tensor) -> str | None:
    """Why ``model`` cannot train batched (vmapped over stacked parameters), or None when it can.

    The check runs two copies of the model vmapped on ``sample`` (a few inputs) and compares
    their outputs with the model's own, so randomness, in-place state and unsupported operations
    are all caught before a run starts."""
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        return f"the model has buffers ({buffers[0]}: e.g. BatchNorm running statistics), which one vmapped step cannot keep per peer"
    if not any(True for _ in model.parameters()):
        return "the model has no parameters to train"
    template = copy.deepcopy(model).train()
    params = {name: torch.stack([p.detach(), p.detach()]) for name, p in template.named_parameters()}
    try:
        stacked = vmap(lambda p, x: functional_call(template, p, (x,)), in_dims=(0, None))(params, sample)
        with torch.no_grad():
            own = template(sample)
    except Exception as error:  # noqa: BLE001 -- any failure of the user's model under vmap means: train it per peer
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        return f"vmap cannot run the model ({type(error).__name__}: {first})"
    if not (torch.allclose(stacked[0], own, atol=1e-5) and torch.allclose(stacked[1], own, atol=1e-5)):
        return "the model's vmapped output differs from its own (randomness, or state kept between calls?)"
    return None


class StackedTrainer(Trainer):
    """A trainer whose model, momentum and last finite state are one row of a BatchedTraining's stacks.

    Training the clock defers may still be pending; anything that reads or changes the model runs it first."""

    engine: BatchedTraining  # set when the engine takes the trainer in, right after it is made
    row: int

    def _settle(self) -> None:
        if self.engine.is_pending(self):
            self.engine.settle()

    def train(self, steps: int) -> float:
        self._settle()
        return self.engine.run([(self, steps)])[0]

    def state(self):
        self._settle()
        return {name: stack[self.row].clone() for name, stack in self.engine.weights.items()}

    def load_state(self, state) -> None:
        self._settle()
        super().load_state(state)

    def evaluate(self) -> tuple[float, float]:
        self._settle()
        return self.engine.evaluate(self)

    def squared_error(self) -> float | None:
        self._settle()
        return super().squared_error()

    def set_progress(self, steps: int) -> None:
        self._settle()
        super().set_progress(steps)

    def reset_optimizer(self) -> None:
        self._settle()
        for buffer in (*self.engine.momentum.values(), *self.engine.second_moment.values()):
            buffer[self.row].zero_()
        self.engine.adam_steps[self.row] = 0

    @torch.no_grad()
    def _copy_in(self, state) -> None:
        for name, tensor in state.items():
            self.engine.weights[name][self.row].copy_(tensor)

    def _remember_finite(self) -> None:
        if not hasattr(self, "engine"):  # still being made: the engine keeps the first copy as it takes it in
            return
        for name, weights in self.engine.weights.items():
            self.engine.last_finite[name][self.row].copy_(weights[self.row])


@dataclass
class _Request:
    trainer: StackedTrainer
    steps: int
    finish_at: float
    future: asyncio.Future


class BatchedTraining:
    """The training of many peers' models of one architecture, run as vmapped steps over their stack."""

    def __init__(self, trainers: list[StackedTrainer], *, workers: int = 1, chunk: int = CHUNK_PEERS):
        first = trainers[0]
        self.optimizer_kind, defaults = first.optimizer_kind, first.optimizer.defaults
        self.momentum_factor, self.weight_decay = defaults.get("momentum", 0.0), defaults["weight_decay"]
        self.betas, self.eps = defaults.get("betas"), defaults.get("eps")
        self.lr, self.schedule, self.sam_rho = first.lr, first.schedule, first.sam_rho
        self.augmentation = first.augmentation
        for trainer in trainers:
            if _optimiser_settings(trainer) != _optimiser_settings(first):
                raise BatchingError("the peers' optimiser settings differ; batched training needs one set for all")
        self.names = [name for name, _ in first.model.named_parameters()]
        self.weights = {
            name: torch.stack([dict(t.model.named_parameters())[name].detach() for t in trainers]) for name in self.names
        }
        # SGD's momentum, or AdamW's first moment; AdamW's second moment and step count per peer.
        self.momentum = {name: torch.zeros_like(stack) for name, stack in self.weights.items()}
        adamw = self.optimizer_kind == "adamw"
        self.second_moment = {name: torch.zeros_like(stack) for name, stack in self.weights.items()} if adamw else {}
        self.adam_steps = torch.zeros(len(trainers), device=first.device)
        self.last_finite = {name: stack.clone() for name, stack in self.weights.items()}
        for row, trainer in enumerate(trainers):
            trainer.engine, trainer.row = self, row
            for name, parameter in trainer.model.named_parameters():
                parameter.data = self.weights[name][row]  # the module now trains its row of the stack
        # Every peer's training data in one tensor, so that one gather takes the whole stack's batch.
        self.offsets = [0]
        for trainer in trainers:
            self.offsets.append(self.offsets[-1] + len(trainer.train_y))
        self.data_x = torch.cat([t.train_x for t in trainers])
        self.data_y = torch.cat([t.train_y for t in trainers])
        self.chunk, self.workers = chunk, workers
        # functional_call swaps a module's tensors while it runs, so each worker thread has its own copy.
        self._modules: queue.SimpleQueue[nn.Module] = queue.SimpleQueue()
        for _ in range(workers):
            self._modules.put(copy.deepcopy(first.model).train())
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="batched") if workers > 1 else None
        self._pending: list[_Request] = []
        self._pending_rows: set[int] = set()
        self._flush: asyncio.TimerHandle | None = None
        self.wall_seconds = 0.0  # real time spent training, for the simulator's overhead accounting
        self.peer_steps = 0  # local steps taken, all peers together

    def claims(self, work: Callable[..., Any]) -> StackedTrainer | None:
        """The trainer whose ``train`` ``work`` is, when it is one of this engine's."""
        trainer = getattr(work, "__self__", None)
        if isinstance(trainer, StackedTrainer) and trainer.engine is self and work.__func__ is StackedTrainer.train:
            return trainer
        return None

    async def train(self, trainer: StackedTrainer, steps: int, *, finish_at: float) -> float:
        """Train ``trainer`` for ``steps`` steps by virtual time ``finish_at``, with whoever asks before then."""
        loop = asyncio.get_running_loop()
        request = _Request(trainer, steps, finish_at, loop.create_future())
        self._pending.append(request)
        self._pending_rows.add(trainer.row)
        if self._flush is None or finish_at < self._flush.when():
            if self._flush is not None:
                self._flush.cancel()
            self._flush = loop.call_at(finish_at, self.settle)
        return await request.future

    def is_pending(self, trainer: StackedTrainer) -> bool:
        return trainer.row in self._pending_rows

    def settle(self) -> None:
        """Run every pending request now; each requester resumes at its own finish time."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        self._pending_rows.clear()
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        losses = self.run([(request.trainer, request.steps) for request in pending])
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # the run is over (its summary reads the models): nobody waits any more
            return
        for request, loss in zip(pending, losses):
            loop.call_at(request.finish_at, _resolve, request.future, loss)

    def run(self, work: list[tuple[StackedTrainer, int]]) -> list[float]:
        """Train each (trainer, steps) pair; return the mean training loss of each."""
        started = time.perf_counter()
        losses = [0.0] * len(work)
        by_steps: dict[int, list[int]] = {}
        for index, (_, steps) in enumerate(work):
            by_steps.setdefault(steps, []).append(index)
        for steps, indices in by_steps.items():
            group = [work[i][0] for i in indices]
            for i, loss in zip(indices, self._train_group(group, steps)):
                losses[i] = loss
        self.wall_seconds += time.perf_counter() - started
        return losses

    def _train_group(self, trainers: list[StackedTrainer], steps: int) -> list[float]:
        if steps <= 0:
            return [0.0] * len(trainers)
        # The per-peer parts, drawn here in the caller's thread so that a run does not depend on the workers.
        device = self.data_x.device
        batch = max(t.batch_size for t in trainers)
        rows = torch.empty(steps, len(trainers), batch, dtype=torch.long, device=device)
        weights = torch.zeros(steps, len(trainers), batch, device=device)
        changes = self._augmentation_draws(trainers, steps, batch)
        for column, trainer in enumerate(trainers):
            offset = self.offsets[trainer.row]
            drawn = [trainer.next_rows() for _ in range(steps)]
            if drawn[0] is None:  # full-batch steps on a shard smaller than the batch: padded, the padding weighted 0
                size = len(trainer.train_y)
                rows[:, column, :size] = torch.arange(offset, offset + size, device=device)
                rows[:, column, size:] = offset
                weights[:, column, :size] = 1.0
            else:
                rows[:, column] = torch.stack(drawn) + offset
                weights[:, column] = 1.0
        rates = torch.tensor(
            [[self._rate(t.steps_taken + step) for t in trainers] for step in range(steps)],
            dtype=self.weights[self.names[0]].dtype, device=device,
        )
        stack_rows = torch.tensor([t.row for t in trainers], device=device)
        count = max(math.ceil(len(trainers) / self.chunk), min(self.workers, len(trainers)))
        bounds = [round(i * len(trainers) / count) for i in range(count + 1)]
        parts = [slice(bounds[i], bounds[i + 1]) for i in range(count)]

        def train_part(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
            drawn = None if changes is None else changes[:, part]
            return self._train_chunk(stack_rows[part], rows[:, part], weights[:, part], rates[:, part], drawn)

        results = list(self._pool.map(train_part, parts)) if self._pool and len(parts) > 1 else [
            train_part(part) for part in parts
        ]
        loss_sums, finite = torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])
        self.peer_steps += len(trainers) * steps
        for trainer, ok in zip(trainers, finite.tolist()):
            trainer.steps_taken += steps
            if not ok:
                trainer.note_rollback()
        return (loss_sums / steps).tolist()

    def _rate(self, step: int) -> float:
        return self.lr * self.schedule.factor(step) if self.schedule else self.lr

    def _augmentation_draws(self, trainers: list[StackedTrainer], steps: int, batch: int) -> torch.Tensor | None:
        """Each peer's augmentation numbers for each step's batch (steps, peers, batch, ...), drawn from its
        own generator as it would draw them alone; None without augmentation."""
        if self.augmentation is None:
            return None
        per_peer = []
        for trainer in trainers:
            size = min(batch, trainer.batch_size)
            drawn = torch.stack([trainer.augmentation_draw(size) for _ in range(steps)])
            # Padding rows of a full-batch step are weighted 0: any numbers do for them.
            per_peer.append(torch.nn.functional.pad(drawn, (0, 0, 0, batch - size)))
        return torch.stack(per_peer, dim=1)

    def _train_chunk(
        self, stack_rows: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, rates: torch.Tensor,
        changes: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K steps of the peers' optimiser (as torch.optim.SGD or AdamW takes them) for the peers in
        ``stack_rows``; returns their summed losses and which of them stayed finite (the others are rolled back)."""
        module = self._modules.get()
        try:
            state = self._optimiser_rows(stack_rows)
            params = {name: self.weights[name][stack_rows] for name in self.names}
            loss_sum = torch.zeros(len(stack_rows), device=stack_rows.device)
            for step in range(rows.shape[0]):
                x, y, w = self.data_x[rows[step]], self.data_y[rows[step]], weights[step]
                if changes is not None:
                    x = self.augmentation.apply(x.flatten(0, 1), changes[step].flatten(0, 1)).view_as(x)
                losses, grads = self._gradients(module, params, x, y, w)
                if self.sam_rho:
                    grads = self._sharpness_aware(module, params, grads, x, y, w)
                self._update(params, grads, state, rates[step])
                loss_sum += losses
            finite = torch.ones(len(stack_rows), dtype=torch.bool, device=stack_rows.device)
            for tensor in params.values():
                finite &= torch.isfinite(tensor).flatten(1).all(dim=1)
            self._keep(stack_rows, params, state, finite)
            return loss_sum, finite
        finally:
            self._modules.put(module)

    def _optimiser_rows(self, stack_rows: torch.Tensor) -> dict[str, Any]:
        return {
            "momentum": {name: self.momentum[name][stack_rows] for name in self.names},
            "second_moment": {name: stack[stack_rows] for name, stack in self.second_moment.items()},
            "steps": self.adam_steps[stack_rows],
        }

    def _update(
        self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], state: dict[str, Any], rate: torch.Tensor
    ) -> None:
        """One optimiser step of every row, as torch.optim.SGD (momentum, L2 decay) or AdamW (decoupled decay) takes it."""
        momentum, second = state["momentum"], state["second_moment"]
        if self.optimizer_kind == "adamw":
            (beta1, beta2), state["steps"] = self.betas, state["steps"] + 1
            first_correction, second_root = 1 - beta1 ** state["steps"], (1 - beta2 ** state["steps"]).sqrt()
        for name in self.names:
            grad, rates = grads[name], per_row(rate, grads[name])
            if self.optimizer_kind == "adamw":
                momentum[name] = beta1 * momentum[name] + (1 - beta1) * grad
                second[name] = beta2 * second[name] + (1 - beta2) * grad * grad
                denominator = second[name].sqrt() / per_row(second_root, grad) + self.eps
                step = momentum[name] / per_row(first_correction, grad) / denominator
                params[name] = params[name] * (1 - rates * self.weight_decay) - rates * step
                continue
            if self.weight_decay:
                grad = grad + self.weight_decay * params[name]
            momentum[name] = self.momentum_factor * momentum[name] + grad
            params[name] = params[name] - rates * momentum[name]

    def _keep(
        self, stack_rows: torch.Tensor, params: dict[str, torch.Tensor], state: dict[str, Any], finite: torch.Tensor
    ) -> None:
        """Write the trained rows back, a row that is no longer finite put back to its last finite model."""
        zero = torch.zeros((), device=finite.device)
        for name in self.names:
            kept = torch.where(per_row(finite, params[name]), params[name], self.last_finite[name][stack_rows])
            self.weights[name].index_copy_(0, stack_rows, kept)
            self.last_finite[name].index_copy_(0, stack_rows, kept)
            # Optimiser state built from non-finite gradients would bring the NaN straight back.
            for stacks, rows in ((self.momentum, state["momentum"]), (self.second_moment, state["second_moment"])):
                if name in rows:
                    stacks[name].index_copy_(0, stack_rows, torch.where(per_row(finite, rows[name]), rows[name], zero))
        self.adam_steps.index_copy_(0, stack_rows, torch.where(finite, state["steps"], zero))

    @staticmethod
    def _gradients(
        module: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each peer's mean loss on its batch and its gradient: one pass of the loss summed over peers."""

        def peer_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            per_sample = label_losses(functional_call(module, p, (x,)), y).reshape(len(w), -1).mean(dim=1)
            return (per_sample * w).sum() / w.sum().clamp(min=1.0)

        leaves = {name: tensor.detach().requires_grad_() for name, tensor in params.items()}
        with torch.enable_grad():
            losses = vmap(peer_loss)(leaves, x, y, w)
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
        return losses.detach(), dict(zip(leaves, grads))

    def _sharpness_aware(
        self, module: nn.Module, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
        x: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Each peer's gradient at the worst point within sam_rho of its model, by its own gradient's norm."""
        norms = torch.zeros(len(w), device=w.device)
        for grad in grads.values():
            norms += grad.flatten(1).pow(2).sum(dim=1)
        scale = self.sam_rho / (norms.sqrt() + 1e-12)
        perturbed = {name: params[name] + grads[name] * per_row(scale, grads[name]) for name in self.names}
        return self._gradients(module, perturbed, x, y, w)[1]

    def evaluate(self, trainer: StackedTrainer) -> tuple[float, float]:
        """Accuracy and mean loss of one peer's model on the test set, split over the worker threads (the
        engine's models have no buffers and no randomness, so they compute alike in training and evaluation)."""
        params = {name: self.weights[name][trainer.row] for name in self.names}
        parts = list(zip(trainer.test_x.tensor_split(self.workers), trainer.test_y.tensor_split(self.workers)))

        def count(part: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            module = self._modules.get()
            try:
                return test_counts(lambda x: functional_call(module, params, (x,)), *part)
            finally:
                self._modules.put(module)

        counts = list(self._pool.map(count, parts)) if self._pool else [count(part) for part in parts]
        n = trainer.test_y.numel()
        return float(sum(c for c, _ in counts)) / n, float(sum(loss for _, loss in counts)) / n

    def close(self) -> None:
        """Run what is still pending (a peer stopped while it trained has trained, as it would alone), then
        stop the threads."""
        self.settle()
        if self._pool is not None:
            self._pool.shutdown()


def _optimiser_settings(trainer: Trainer) -> tuple:
    defaults = trainer.optimizer.defaults
    return (
        trainer.optimizer_kind, trainer.lr, trainer.schedule, trainer.sam_rho, trainer.augmentation,
        defaults.get("momentum"), defaults["weight_decay"], defaults.get("betas"), defaults.get("eps"),
    )


def per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One value per row of a stack, shaped to broadcast over ``like``'s other dimensions."""
    return values.view((-1,) + (1,) * (like.dim() - 1))


def _resolve(future: asyncio.Future, loss: float) -> None:
    if not future.done():  # a peer that crashed while it trained no longer waits
        future.set_result(loss)
