"""The Task record every training task is loaded into, and its checks."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


class TaskError(ValueError):
    """A task could not be loaded or is malformed; the message says what to do."""


def cache_dir() -> Path:
    """Folder for generated or downloaded data: $PEER_CACHE_DIR, else ~/.cache/peer."""
    return Path(os.environ.get("PEER_CACHE_DIR") or Path.home() / ".cache" / "peer")


@dataclass(frozen=True, eq=False)  # eq=False: field-wise equality on tensors is ambiguous
class Task:
    """A classification dataset and a factory for the model that learns it."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    make_model: Callable[[], torch.nn.Module]
    # A step size that trains this model well with SGD and momentum 0.9; used when --lr is not given.
    learning_rate: float = 0.05
    # The peer (0..P-1) each training sample was generated for, when the task comes split: the natural partition.
    owners: torch.Tensor | None = None
    # L2 regularisation lambda; used when --weight-decay is not given.
    weight_decay: float = 0.0
    # Given the peers' training shards [(x_i, y_i)] and lambda, the exact minimiser of the mean over
    # shards of each shard's mean loss plus lambda / 2 ||theta||^2, as float64 tensors named like
    # make_model().state_dict(); runs report their squared distance to it.
    optimum: Callable[[list[tuple[torch.Tensor, torch.Tensor]], float], dict[str, torch.Tensor]] | None = None

    def validate(self) -> None:
        """Raise TaskError unless the data and the model fit together."""
        if not self.learning_rate > 0:
            raise TaskError(f"task {self.name!r}: learning_rate must be > 0, got {self.learning_rate!r}")
        if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < math.inf):
            raise TaskError(f"task {self.name!r}: weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.optimum is not None and not callable(self.optimum):
            raise TaskError(f"task {self.name!r}: optimum must be callable or None, got {type(self.optimum).__name__}")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise TaskError(f"task {self.name!r}: num_classes must be an int >= 2, got {self.num_classes!r}")
        for split in ("train", "test"):
            self._validate_split(split, getattr(self, f"{split}_x"), getattr(self, f"{split}_y"))
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise TaskError(
                f"task {self.name!r}: train and test samples differ in shape "
                f"({tuple(self.train_x.shape[1:])} vs {tuple(self.test_x.shape[1:])})"
            )
        self._validate_owners()
        self._validate_model()

    def _validate_owners(self) -> None:
        if self.owners is None:
            return
        where = f"task {self.name!r}: owners"
        if not isinstance(self.owners, torch.Tensor) or self.owners.dtype != torch.int64:
            raise TaskError(f"{where} must be an int64 torch.Tensor of peer indices")
        if tuple(self.owners.shape) != (len(self.train_y),):
            raise TaskError(
                f"{where} must name one peer per training sample, shape ({len(self.train_y)},), "
                f"got {tuple(self.owners.shape)}"
            )
        if int(self.owners.min()) < 0:
            raise TaskError(f"{where} must be peer indices >= 0, got {int(self.owners.min())}")
        peers = torch.unique(self.owners)  # sorted
        gaps = torch.nonzero(peers != torch.arange(len(peers)))
        if len(gaps):
            missing, last = int(gaps[0]), int(peers[-1])
            raise TaskError(f"{where} must name every peer from 0 to {last}, but peer {missing} has no samples")

    def _validate_split(self, split: str, x: torch.Tensor, y: torch.Tensor) -> None:
        where = f"task {self.name!r}: {split}"
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TaskError(f"{where}_x and {split}_y must be torch.Tensors")
        if x.dtype != torch.float32:
            raise TaskError(f"{where}_x must be float32, got {x.dtype}")
        if y.dtype != torch.int64:
            raise TaskError(f"{where}_y must be int64 class labels, got {y.dtype}")
        if y.dim() != 1:
            raise TaskError(f"{where}_y must be 1-D, got shape {tuple(y.shape)}")
        if x.dim() < 1 or len(x) != len(y):
            raise TaskError(f"{where}_x has {len(x) if x.dim() else 0} samples but {split}_y has {len(y)} labels")
        if len(y) == 0:
            raise TaskError(f"{where} set is empty")
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise TaskError(f"{where}_y must lie in [0, {self.num_classes}), got [{int(y.min())}, {int(y.max())}]")
        if not bool(torch.isfinite(x).all()):
            raise TaskError(f"{where}_x contains NaN or infinite values")

    def _validate_model(self) -> None:
        where = f"task {self.name!r}"
        # Building a model draws from torch's RNG; fork it so validating does not shift the caller's seed.
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model = self.make_model()
            if not isinstance(model, torch.nn.Module):
                raise TaskError(f"{where}: make_model() must return a torch.nn.Module, got {type(model).__name__}")
            try:
                out = model(self.train_x[:2])
            except Exception as err:
                shape = tuple(self.train_x[:2].shape)
                raise TaskError(f"{where}: the model fails on input of shape {shape}: {err}") from err
        expected = (min(2, len(self.train_x)), self.num_classes)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise TaskError(f"{where}: the model must output shape {expected} (samples, num_classes), got {got}")
