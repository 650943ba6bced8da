"""Training tasks (dataset + model) by name, user-defined tasks, and partitions across peers.

- ``__init__.py`` (here): ``load_task``, which loads a built-in task by name or a user's ``module:function``.
- ``base.py``: the ``Task`` record every task is loaded into, its checks, and the cache folder.
- ``mnist1d.py``: MNIST-1D, generated locally, and its small 1-D CNN.
- ``fashion_mnist.py``: Fashion-MNIST from its IDX files (optionally downloaded), and a small CNN.
- ``cifar10.py``: CIFAR-10 from a JPEG tarball or the python batches (optionally downloaded), cached as
  uint8, and a GroupNorm CNN.
- ``augment.py``: random crops and flips of training images, drawn from each peer's generator.
- ``logistic.py``: synthetic logistic regression with one part per peer and its exact regularised optimum.
- ``shakespeare.py``: tiny-shakespeare, next-character prediction split by speaker; ``gpt.py``: its character GPT.
- ``partition.py``: splitting the training set across peers: IID, Dirichlet, shards, or the task's own split.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from peer.tasks.base import Task, TaskError, allowing_downloads
from peer.tasks.cifar10 import load_cifar10
from peer.tasks.fashion_mnist import load_fashion_mnist
from peer.tasks.logistic import load_logistic
from peer.tasks.mnist1d import load_mnist1d
from peer.tasks.partition import PARTITION_SPECS, PartitionError, partition
from peer.tasks.shakespeare import load_shakespeare

__all__ = ["PARTITION_SPECS", "TASK_NAMES", "PartitionError", "Task", "TaskError", "load_task", "partition"]

_BUILTIN_LOADERS: dict[str, Callable[[Path | None], Task]] = {
    "mnist1d": load_mnist1d,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
}
# Generated with one part per peer, so it is loaded for a number of peers rather than from data_dir.
_PER_PEER_LOADERS: dict[str, Callable[[int], Task]] = {"logistic": load_logistic}
# Read from data_dir, with a natural split for the number of peers when it is given.
_SPLIT_LOADERS: dict[str, Callable[[Path | None, int | None], Task]] = {"shakespeare": load_shakespeare}
TASK_NAMES = (*_BUILTIN_LOADERS, *_PER_PEER_LOADERS, *_SPLIT_LOADERS)
MIN_MNIST1D_SAMPLES, MAX_MNIST1D_SAMPLES = 100, 1_000_000
_USER_TASK_CONTRACT = "def FUNCTION(data_dir: Path | None) -> peer.tasks.Task"


def load_task(spec: str, data_dir: Path | None = None, peers: int | None = None, *, download: bool = False) -> Task:
    """Load and validate a built-in task by name, or a user's task given as module:function.

    peers is the number of peers, which a task generated with one part per peer needs, and
    which a task with a natural split (shakespeare) splits its data for. download lets a loader
    fetch files it does not find (as PEER_DOWNLOAD=1 does)."""
    with allowing_downloads(download):
        task = _loaded(spec, data_dir, peers)
    task.validate()
    return task


def _loaded(spec: str, data_dir: Path | None, peers: int | None) -> Task:
    name, _, samples = spec.partition(":")
    if spec in _PER_PEER_LOADERS:
        if peers is None:
            raise TaskError(f"task {spec!r} generates one part per peer: load it with the number of peers")
        task = _PER_PEER_LOADERS[spec](peers)
    elif spec in _BUILTIN_LOADERS:
        task = _BUILTIN_LOADERS[spec](data_dir)
    elif spec in _SPLIT_LOADERS:
        task = _SPLIT_LOADERS[spec](data_dir, peers)
    elif name == "mnist1d":
        if not samples.isdigit() or not MIN_MNIST1D_SAMPLES <= int(samples) <= MAX_MNIST1D_SAMPLES:
            raise TaskError(
                f"task {spec!r}: mnist1d:SAMPLES takes a whole number of sequences from "
                f"{MIN_MNIST1D_SAMPLES} to {MAX_MNIST1D_SAMPLES}, e.g. mnist1d:25000"
            )
        task = load_mnist1d(data_dir, int(samples))
    elif ":" in spec:
        task = _load_user_task(spec, data_dir)
    else:
        raise TaskError(
            f"unknown task {spec!r}: use one of {', '.join(TASK_NAMES)}, mnist1d:SAMPLES, or module:function for your own"
        )
    return task


def _load_user_task(spec: str, data_dir: Path | None) -> Task:
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name.isidentifier():
        raise TaskError(f"task {spec!r} must look like module:function, e.g. mytasks:cifar")
    # A console script does not put the working directory on sys.path as `python -m` does;
    # users expect a task module next to them to be found, so look there last.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise TaskError(
            f"cannot import task module {module_name!r} ({_one_line(err)}): put it on PYTHONPATH or run from its folder"
        ) from err
    except Exception as err:  # the user's module failed as it ran: say how, in one line
        raise TaskError(f"task {spec}: importing {module_name} raised {_described(err)}") from err
    function = getattr(module, function_name, None)
    if not callable(function):
        raise TaskError(f"module {module_name!r} has no function {function_name!r}: define {_USER_TASK_CONTRACT}")
    try:
        task = function(data_dir)
    except Exception as err:  # the user's function failed: say how, in one line
        raise TaskError(f"task {spec} raised {_described(err)}") from err
    if not isinstance(task, Task):
        raise TaskError(f"task {spec} returned {type(task).__name__}, but it must be {_USER_TASK_CONTRACT}")
    return task


def _described(error: Exception) -> str:
    """An exception as its type and message, on one line: ``ValueError: boom``."""
    message = _one_line(error)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
