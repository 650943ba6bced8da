"""Fashion-MNIST, read from its canonical IDX files, and a small CNN that learns it."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from peer.tasks.base import Task, TaskError, cache_dir, downloads_allowed, fetch_checked

NUM_CLASSES = 10
IMAGE_SIDE = 28
FOLDER_NAME = "fashion-mnist"
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# Published by Zalando; a download is only kept when it matches.
SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
_FIX = (
    f"pass --data-dir pointing at the folder that contains {FOLDER_NAME}/ (e.g. ~/data), "
    "or give --download (or set PEER_DOWNLOAD=1) to download it"
)
_UNSIGNED_BYTE = 0x08  # the IDX type code of every Fashion-MNIST file


def load_fashion_mnist(data_dir: Path | None) -> Task:
    """The Fashion-MNIST task from data_dir/fashion-mnist/ or data_dir itself.

    Without data_dir the files are looked for, and downloaded when PEER_DOWNLOAD=1, in the cache dir.
    """
    folder = _find_or_download(data_dir)
    train_images = read_idx(folder / "train-images-idx3-ubyte.gz", (None, IMAGE_SIDE, IMAGE_SIDE))
    train_labels = read_idx(folder / "train-labels-idx1-ubyte.gz", (len(train_images),))
    test_images = read_idx(folder / "t10k-images-idx3-ubyte.gz", (None, IMAGE_SIDE, IMAGE_SIDE))
    test_labels = read_idx(folder / "t10k-labels-idx1-ubyte.gz", (len(test_images),))
    train_x = train_images.astype(np.float32) / 255.0
    test_x = test_images.astype(np.float32) / 255.0
    mean, std = train_x.mean(), train_x.std()
    return Task(
        name="fashion-mnist",
        train_x=torch.from_numpy((train_x - mean) / std).unsqueeze(1),
        train_y=torch.from_numpy(train_labels.astype(np.int64)),
        test_x=torch.from_numpy((test_x - mean) / std).unsqueeze(1),
        test_y=torch.from_numpy(test_labels.astype(np.int64)),
        num_classes=NUM_CLASSES,
        make_model=make_fashion_mnist_model,
        learning_rate=0.02,
    )


def make_fashion_mnist_model() -> nn.Module:
    """Two conv/pool stages and a linear classifier: small enough for one CPU thread.

    16/32 channels reach about 0.87 test accuracy after one epoch alone (~13 ms per step of 32 on one
    thread); halving them to 8/16 saves half the time but falls just short of that.
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, NUM_CLASSES),
    )


def read_idx(path: Path, expected_shape: tuple[int | None, ...]) -> np.ndarray:
    """Decode a gzipped IDX file of unsigned bytes; None in expected_shape accepts any size."""
    try:
        with gzip.open(path, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError, zlib.error) as err:
        raise _damaged(path, f"gzip: {err}") from err
    # Header: two zero bytes, a type code, the number of dimensions, then each dimension as big-endian uint32.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _UNSIGNED_BYTE:
        raise _damaged(path, "no IDX magic number for unsigned bytes")
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if ndim != len(expected_shape) or len(raw) < header_size:
        raise _damaged(path, f"IDX header with {ndim} dimensions, expected {len(expected_shape)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if any(want is not None and want != got for want, got in zip(expected_shape, shape)):
        raise _damaged(path, f"array of shape {shape}, expected {expected_shape}")
    if len(raw) - header_size != int(np.prod(shape)):
        raise _damaged(path, f"{len(raw) - header_size} data bytes for shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _damaged(path: Path, detail: str) -> TaskError:
    return TaskError(f"{path} is damaged ({detail}): replace it with a good copy, or delete it and set PEER_DOWNLOAD=1")


def _find_or_download(data_dir: Path | None) -> Path:
    candidates = [cache_dir() / FOLDER_NAME] if data_dir is None else [data_dir / FOLDER_NAME, data_dir]
    for folder in candidates:
        if all((folder / name).is_file() for name in SHA256):
            return folder
    target = _download_target(data_dir)
    if downloads_allowed():
        _download(target)
        return target
    if data_dir is None:
        raise TaskError(f"fashion-mnist needs its data files: {_FIX}")
    if not data_dir.is_dir():
        raise TaskError(f"data directory {data_dir} does not exist: {_FIX}")
    missing = ", ".join(name for name in SHA256 if not (target / name).is_file())
    raise TaskError(f"Fashion-MNIST files missing from {target} ({missing}): {_FIX}")


def _download_target(data_dir: Path | None) -> Path:
    if data_dir is None:
        return cache_dir() / FOLDER_NAME
    # A data_dir that already names the dataset's folder is where the files belong.
    return data_dir if data_dir.name == FOLDER_NAME else data_dir / FOLDER_NAME


def _download(folder: Path) -> None:
    for name, digest in SHA256.items():
        if not (folder / name).is_file():
            fetch_checked(DOWNLOAD_URL + name, folder / name, "sha256", digest, f"put the files in {folder}")
