"""The Task record every training task is loaded into, and its checks.

A task's samples are float32 features, uint8 images (the model scales them) or int64 token ids
(the model embeds them). Each sample has one class label, or one per position (a language
model's next tokens): loss and accuracy are then taken over every label of every sample.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from peer.tasks.augment import Augmentation


class TaskError(ValueError):
    """A task could not be loaded or is malformed; the message says what to do."""


OPTIMIZERS = ("sgd", "adamw")
SAMPLE_DTYPES = (torch.float32, torch.uint8, torch.int64)


# Set while load_task runs for a run given --download; PEER_DOWNLOAD=1 allows it for every run.
_DOWNLOAD: contextvars.ContextVar[bool] = contextvars.ContextVar("download", default=False)
DOWNLOAD_ENV = "PEER_DOWNLOAD"
_DOWNLOAD_CHUNK = 1 << 20
DIGEST_NAMES = {"sha256": "SHA-256", "md5": "MD5"}


def downloads_allowed() -> bool:
    """Whether a loader may fetch missing files: --download, or PEER_DOWNLOAD=1."""
    return _DOWNLOAD.get() or os.environ.get(DOWNLOAD_ENV) == "1"


@contextlib.contextmanager
def allowing_downloads(allowed: bool) -> Iterator[None]:
    token = _DOWNLOAD.set(allowed)
    try:
        yield
    finally:
        _DOWNLOAD.reset(token)


def fetch_checked(url: str, target: Path, algorithm: str, digest: str, otherwise: str) -> None:
    """Download ``url`` to ``target``, kept only when its ``algorithm`` digest (sha256, md5) is the
    published ``digest``: streamed beside it, then renamed, so that an interrupted or rejected
    download leaves nothing that looks complete. ``otherwise``: what the user can do instead."""
    target.parent.mkdir(parents=True, exist_ok=True)
    hasher = hashlib.new(algorithm, usedforsecurity=False)
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    while chunk := response.read(_DOWNLOAD_CHUNK):
                        hasher.update(chunk)
                        file.write(chunk)
            except (urllib.error.URLError, OSError) as error:
                reason = " ".join(str(error).split())
                raise TaskError(f"downloading {url} failed ({reason}): check the connection or {otherwise}") from error
        if hasher.hexdigest() != digest:
            raise TaskError(f"{url} does not match its published {DIGEST_NAMES[algorithm]}; retry later or {otherwise}")
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def cache_dir() -> Path:
    """Folder for generated or downloaded data: $PEER_CACHE_DIR, else ~/.cache/peer."""
    return Path(os.environ.get("PEER_CACHE_DIR") or Path.home() / ".cache" / "peer")


@dataclass(frozen=True, eq=False)  # eq=False: field-wise equality on tensors is ambiguous
class Task:
    """A classification dataset (one label per sample, or per position) and a factory for the model that learns it."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    make_model: Callable[[], torch.nn.Module]
    # A step size that trains this model well with its optimiser; used when --lr is not given.
    learning_rate: float = 0.05
    # The local optimiser that suits the model (SGD with momentum, or AdamW); used when --optimizer is not given.
    optimizer: Literal["sgd", "adamw"] = "sgd"
    # Random changes to each training batch (e.g. crops and flips of images), drawn from each peer's seed.
    augmentation: Augmentation | None = None
    # The peer (0..P-1) each training sample was generated for, when the task comes split: the natural partition.
    owners: torch.Tensor | None = None
    # What iid, Dirichlet and shard partitions split by when it is not the label: e.g. each text
    # window's speaker, where the labels are the next characters. One int64 per training sample.
    groups: torch.Tensor | None = None
    # L2 regularisation lambda; used when --weight-decay is not given.
    weight_decay: float = 0.0
    # Given the peers' training shards [(x_i, y_i)] and lambda, the exact minimiser of the mean over
    # shards of each shard's mean loss plus lambda / 2 ||theta||^2, as float64 tensors named like
    # make_model().state_dict(); runs report their squared distance to it.
    optimum: Callable[[list[tuple[torch.Tensor, torch.Tensor]], float], dict[str, torch.Tensor]] | None = None

    def partition_labels(self) -> torch.Tensor:
        """The label of each training sample that partitions split by: its group, or its class."""
        return self.train_y if self.groups is None else self.groups

    def validate(self) -> None:
        """Raise TaskError unless the data and the model fit together."""
        if self.optimizer not in OPTIMIZERS:
            raise TaskError(f"task {self.name!r}: optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
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
        if self.train_y.shape[1:] != self.test_y.shape[1:] or self.train_x.dtype != self.test_x.dtype:
            raise TaskError(
                f"task {self.name!r}: train and test differ in label shape or sample type "
                f"({tuple(self.train_y.shape[1:])} {self.train_x.dtype} vs {tuple(self.test_y.shape[1:])} {self.test_x.dtype})"
            )
        self._validate_owners()
        self._validate_groups()
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

    def _validate_groups(self) -> None:
        if self.groups is not None and (
            not isinstance(self.groups, torch.Tensor) or self.groups.dtype != torch.int64
            or tuple(self.groups.shape) != (len(self.train_y),)
        ):
            raise TaskError(f"task {self.name!r}: groups must be an int64 torch.Tensor with one group per training sample")
        if self.groups is None and self.train_y.dim() > 1:
            raise TaskError(f"task {self.name!r}: labels per position need groups (one per sample) for partitions to split by")

    def _validate_split(self, split: str, x: torch.Tensor, y: torch.Tensor) -> None:
        where = f"task {self.name!r}: {split}"
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TaskError(f"{where}_x and {split}_y must be torch.Tensors")
        if x.dtype not in SAMPLE_DTYPES:
            raise TaskError(f"{where}_x must be float32 features, uint8 images or int64 token ids, got {x.dtype}")
        if y.dtype != torch.int64:
            raise TaskError(f"{where}_y must be int64 class labels, got {y.dtype}")
        if y.dim() not in (1, 2):
            raise TaskError(f"{where}_y must hold one label per sample or one per position, got shape {tuple(y.shape)}")
        if x.dim() < 1 or len(x) != len(y):
            raise TaskError(f"{where}_x has {len(x) if x.dim() else 0} samples but {split}_y has {len(y)} labels")
        if len(y) == 0:
            raise TaskError(f"{where} set is empty")
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise TaskError(f"{where}_y must lie in [0, {self.num_classes}), got [{int(y.min())}, {int(y.max())}]")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
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
        expected = (min(2, len(self.train_x)), *self.train_y.shape[1:], self.num_classes)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            layout = "(samples, num_classes)" if self.train_y.dim() == 1 else "(samples, positions, num_classes)"
            raise TaskError(f"{where}: the model must output shape {expected} {layout}, got {got}")
