"""MNIST-1D, generated locally, and the small 1-D CNN that learns it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from peer.tasks.base import Task, cache_dir

NUM_CLASSES = 10
SEQUENCE_LENGTH = 40
_ARRAY_NAMES = ("x", "y", "x_test", "y_test")


DEFAULT_SAMPLES = 5000  # the generator's own default: 4,000 to train on, 1,000 to test


def load_mnist1d(data_dir: Path | None = None, samples: int = DEFAULT_SAMPLES) -> Task:
    """The MNIST-1D task with ``samples`` sequences, 80% of them for training; data_dir is unused
    because the data is generated, not read. More samples give each of many peers a real share."""
    arrays = _cached_dataset(samples)
    train_x = arrays["x"].astype(np.float32)
    test_x = arrays["x_test"].astype(np.float32)
    mean, std = train_x.mean(), train_x.std()
    return Task(
        name="mnist1d" if samples == DEFAULT_SAMPLES else f"mnist1d:{samples}",
        train_x=torch.from_numpy((train_x - mean) / std).unsqueeze(1),
        train_y=torch.from_numpy(arrays["y"].astype(np.int64)),
        test_x=torch.from_numpy((test_x - mean) / std).unsqueeze(1),
        test_y=torch.from_numpy(arrays["y_test"].astype(np.int64)),
        num_classes=NUM_CLASSES,
        make_model=make_mnist1d_model,
        learning_rate=0.1,
    )


def make_mnist1d_model() -> nn.Module:
    """The standard MNIST-1D CNN: three strided convolutions and a linear classifier."""
    channels = 25
    # Each stride-2 convolution shrinks the sequence: 40 -> 19 -> 10 -> 5.
    final_length = 5
    return nn.Sequential(
        nn.Conv1d(1, channels, kernel_size=5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * final_length, NUM_CLASSES),
    )


def _cached_dataset(samples: int) -> dict[str, np.ndarray]:
    """The generated arrays, from the cache when an intact copy is there."""
    # Imported here, not at the top, because it pulls in scipy and matplotlib (over a second)
    # and only this task needs it.
    import mnist1d.data

    args = mnist1d.data.get_dataset_args(as_dict=True)
    args["num_samples"] = samples
    path = cache_dir() / f"mnist1d-{_cache_key(args)}.npz"
    try:
        with np.load(path) as stored:
            return {name: stored[name] for name in _ARRAY_NAMES}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        pass  # absent or damaged: generate afresh and overwrite
    arrays = _generate(mnist1d.data, args)
    _write_atomically(path, arrays)
    return arrays


def _cache_key(args: dict) -> str:
    # The generator's version is part of the key because its output may change between releases.
    identity = {"args": args, "mnist1d": importlib.metadata.version("mnist1d")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _generate(generator, args: dict) -> dict[str, np.ndarray]:
    # make_dataset reseeds the global `random` and numpy RNGs; restore them so loading has no side effects.
    random_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        dataset = generator.make_dataset(generator.ObjectView(args))
    finally:
        random.setstate(random_state)
        np.random.set_state(numpy_state)
    return {name: np.asarray(dataset[name]) for name in _ARRAY_NAMES}


def _write_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # A reader never sees a half-written file, even with several peers starting at once.
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as tmp:
        np.savez(tmp, **arrays)
    os.replace(tmp.name, path)
