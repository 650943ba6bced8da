"""CIFAR-10, read from a tarball of JPEGs or the standard python batches, and a GroupNorm CNN that learns it.

The images are decoded once into a uint8 cache (``cache_dir()/cifar10-<key>.npz``, the key taken
from the source files' contents) and kept as uint8 (N, 3, 32, 32): the model standardises them.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from peer.tasks.augment import CropAndFlip
from peer.tasks.base import Task, TaskError, cache_dir, downloads_allowed, fetch_checked

# The standard class order: label i is CLASSES[i].
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = len(CLASSES)
IMAGE_SIDE = 32
IMAGE_SHAPE = (3, IMAGE_SIDE, IMAGE_SIDE)
FOLDER_NAME = "cifar10"
JPEG_TARBALL = "cifar10_jpeg.tar.gz"
BATCHES_FOLDER = "cifar-10-batches-py"
BATCHES_ARCHIVE = "cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_BATCH = "batches.meta"
DOWNLOAD_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# Published with the archive; a download is only kept when it matches.
DOWNLOAD_MD5 = "c58f30108f718f92721af3b95e74349a"
# Per-channel mean and standard deviation of the training images scaled to [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# Widths of the model's stages (16x16, 8x8 and 4x4 feature maps) and its GroupNorm groups.
STEM_WIDTH, MIDDLE_WIDTH, LAST_WIDTH = 32, 64, 128
NORM_GROUPS = 8

_SOURCES = f"{JPEG_TARBALL}, {BATCHES_FOLDER}/ or {BATCHES_ARCHIVE}"
_FIX = (
    f"pass --data-dir pointing at the folder that contains {FOLDER_NAME}/ (e.g. ~/data), "
    "or give --download (or set PEER_DOWNLOAD=1) to download it"
)
_CACHE_VERSION = b"cifar10 uint8 cache 1"
_CHUNK = 1 << 20


def load_cifar10(data_dir: Path | None) -> Task:
    """The CIFAR-10 task from data_dir/cifar10/ or data_dir itself: the JPEG tarball, else the python batches.

    Without data_dir the files are looked for, and downloaded when PEER_DOWNLOAD=1, in the cache dir's cifar10/.
    """
    source = _find_or_download(data_dir)
    arrays = _cached_arrays(source)
    return Task(
        name="cifar10",
        train_x=torch.from_numpy(arrays["train_x"]),
        train_y=torch.from_numpy(arrays["train_y"]),
        test_x=torch.from_numpy(arrays["test_x"]),
        test_y=torch.from_numpy(arrays["test_y"]),
        num_classes=NUM_CLASSES,
        make_model=make_cifar10_model,
        optimizer="sgd",
        learning_rate=0.05,
        weight_decay=5e-4,
        augmentation=CropAndFlip(4),
    )


# ---------------------------------------------------------------------------------------------
# The model


class Standardize(nn.Module):
    """uint8 pixels (0..255) to floats standardised per channel by the CIFAR-10 mean and std.

    The constants stay plain Python floats, applied channel by channel: not buffers, which a model
    trained batched over stacked parameters cannot have, and not tensors made on each call, which
    on a GPU would be a copy from the host, and a wait for it, at every step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        channels = [
            (x[:, channel] - 255.0 * mean) * (1.0 / (255.0 * std))
            for channel, (mean, std) in enumerate(zip(CIFAR10_MEAN, CIFAR10_STD))
        ]
        return torch.stack(channels, dim=1)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm, added to the block's input."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_norm(width, width),
            nn.ReLU(),
            *_conv_norm(width, width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def _conv_norm(in_channels: int, out_channels: int) -> tuple[nn.Module, nn.Module]:
    # GroupNorm's own shift makes a convolution bias redundant.
    return (
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.GroupNorm(NORM_GROUPS, out_channels),
    )


def make_cifar10_model() -> nn.Module:
    """A small residual CNN with GroupNorm (no BatchNorm, no buffers, no dropout), so it trains batched.

    32x32 -> 16x16 (32 channels) -> 64 channels with a residual block -> 8x8 -> 4x4 (128 channels)
    -> global average -> 10 logits."""
    return nn.Sequential(
        Standardize(),
        *_conv_norm(3, STEM_WIDTH),
        nn.ReLU(),
        nn.MaxPool2d(2),
        *_conv_norm(STEM_WIDTH, MIDDLE_WIDTH),
        nn.ReLU(),
        ResidualBlock(MIDDLE_WIDTH),
        nn.MaxPool2d(2),
        *_conv_norm(MIDDLE_WIDTH, LAST_WIDTH),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(LAST_WIDTH, NUM_CLASSES),
    )


# ---------------------------------------------------------------------------------------------
# Finding, downloading and caching the files


def _find_or_download(data_dir: Path | None) -> Path:
    """The first source found: the JPEG tarball, the batches folder or the python archive."""
    folders = [cache_dir() / FOLDER_NAME] if data_dir is None else [data_dir / FOLDER_NAME, data_dir]
    for folder in folders:
        source = _source_in(folder)
        if source is not None:
            return source
    target = _download_target(data_dir)
    if downloads_allowed():
        return _download(target)
    if data_dir is None:
        raise TaskError(f"cifar10 needs its data files ({_SOURCES}), none of them in {target}: {_FIX}")
    if not data_dir.is_dir():
        raise TaskError(f"data directory {data_dir} does not exist: {_FIX}")
    for folder in folders:
        partial = folder / BATCHES_FOLDER
        if partial.is_dir():
            missing = ", ".join(name for name in (*TRAIN_BATCHES, TEST_BATCH) if not (partial / name).is_file())
            raise TaskError(f"CIFAR-10 files missing from {partial} ({missing}): {_FIX}")
    places = " or ".join(str(folder) for folder in folders)
    raise TaskError(f"CIFAR-10 files missing from {places} (looked for {_SOURCES}): {_FIX}")


def _source_in(folder: Path) -> Path | None:
    if (folder / JPEG_TARBALL).is_file():
        return folder / JPEG_TARBALL
    batches = folder / BATCHES_FOLDER
    if all((batches / name).is_file() for name in (*TRAIN_BATCHES, TEST_BATCH)):
        return batches
    if (folder / BATCHES_ARCHIVE).is_file():
        return folder / BATCHES_ARCHIVE
    return None


def _download_target(data_dir: Path | None) -> Path:
    if data_dir is None:
        return cache_dir() / FOLDER_NAME
    # A data_dir that already names the dataset's folder is where the files belong.
    return data_dir if data_dir.name == FOLDER_NAME else data_dir / FOLDER_NAME


def _torchvision_datasets():
    """torchvision.datasets when torchvision is installed (the optional extra ``vision``), else None."""
    try:
        import torchvision.datasets
    except ImportError:
        return None
    return torchvision.datasets


def _download(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    datasets = _torchvision_datasets()
    if datasets is not None:
        try:
            for train in (True, False):  # downloads and checks the archive once, extracts the batches
                datasets.CIFAR10(root=str(folder), train=train, download=True)
        except Exception as err:  # torchvision raises what urllib, tarfile or its checks raise
            raise TaskError(
                f"downloading CIFAR-10 with torchvision into {folder} failed ({_one_line(err)}): "
                f"check the connection or put {_SOURCES} in {folder}"
            ) from err
        source = _source_in(folder)
        if source is None:
            raise TaskError(f"torchvision left no {BATCHES_FOLDER}/ in {folder}: put {_SOURCES} there yourself")
        return source
    target = folder / BATCHES_ARCHIVE
    fetch_checked(DOWNLOAD_URL, target, "md5", DOWNLOAD_MD5, f"put {_SOURCES} in {target.parent}")
    return target


def _cached_arrays(source: Path) -> dict[str, np.ndarray]:
    """The decoded arrays of source, from the cache when an intact copy is there."""
    path = cache_dir() / f"cifar10-{_cache_key(source)}.npz"
    try:
        with np.load(path) as stored:
            arrays = {name: stored[name] for name in ("train_x", "train_y", "test_x", "test_y")}
        _check_arrays(arrays)
        return arrays
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, zlib.error):
        pass  # absent or damaged: decode afresh and overwrite
    arrays = _decode(source)
    _write_atomically(path, arrays)
    return arrays


def _cache_key(source: Path) -> str:
    """The first 16 hex digits of a SHA-256 over the source's contents (each batch file, for a folder)."""
    digest = hashlib.sha256(_CACHE_VERSION)
    files = [source / name for name in (*TRAIN_BATCHES, TEST_BATCH)] if source.is_dir() else [source]
    for file in files:
        digest.update(file.name.encode() + b"\0")
        try:
            with open(file, "rb") as stream:
                while chunk := stream.read(_CHUNK):
                    digest.update(chunk)
        except OSError as err:
            raise TaskError(f"cannot read {file} ({_one_line(err)}): check its permissions or replace it") from err
    return digest.hexdigest()[:16]


def _check_arrays(arrays: dict[str, np.ndarray]) -> None:
    """Raise ValueError unless the arrays are images and labels of the shapes and types a cache holds."""
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE or len(x) == 0:
            raise ValueError(f"{split} images of {x.dtype} {x.shape}")
        if y.dtype != np.int64 or y.shape != (len(x),) or int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES:
            raise ValueError(f"{split} labels of {y.dtype} {y.shape}")


def _write_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # A reader never sees a half-written file, even with several peers starting at once.
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as tmp:
        np.savez(tmp, **arrays)
    os.replace(tmp.name, path)


def _decode(source: Path) -> dict[str, np.ndarray]:
    if source.name == JPEG_TARBALL:
        return _decode_jpeg_tarball(source)
    if source.is_dir():
        meta = source / META_BATCH
        return _decode_batches(
            lambda name: (source / name, _read_file(source / name)),
            (meta, _read_file(meta)) if meta.is_file() else None,
        )
    return _decode_batches_archive(source)


# ---------------------------------------------------------------------------------------------
# The JPEG tarball: train/<class>/NNNN.jpg and test/<class>/NNNN.jpg


def _decode_jpeg_tarball(path: Path) -> dict[str, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    members = {"train": [], "test": []}
    for name, data in _tar_files(path):
        parts = [part for part in name.split("/") if part not in ("", ".")]
        if len(parts) != 3 or parts[0] not in members:
            continue
        split, folder, _ = parts
        if folder not in CLASSES:
            raise _damaged(path, f"class folder {split}/{folder}/ is not one of {', '.join(CLASSES)}")
        members[split].append((CLASSES.index(folder), name, data))
    arrays = {}
    for split, found in members.items():
        if not found:
            raise _damaged(path, f"no {split}/<class>/ images in it")
        found.sort(key=lambda member: member[:2])  # by class, then file name: the same order from any tar
        images = np.empty((len(found), IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
        for row, (_, name, data) in enumerate(found):
            try:
                with Image.open(io.BytesIO(data)) as image:
                    pixels = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
                raise _damaged(path, f"{name} is not a readable image: {_one_line(err)}") from err
            if pixels.shape != images.shape[1:]:
                height, width = pixels.shape[:2]
                raise _damaged(path, f"{name} is {width}x{height}, expected {IMAGE_SIDE}x{IMAGE_SIDE}")
            images[row] = pixels
        arrays[f"{split}_x"] = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        arrays[f"{split}_y"] = np.array([label for label, _, _ in found], dtype=np.int64)
    return arrays


def _tar_files(path: Path) -> Iterator[tuple[str, bytes]]:
    """Each regular file of a gzipped tar, read in order, as (name, contents)."""
    try:
        with tarfile.open(path, "r|gz") as tar:
            for member in tar:
                if member.isfile():
                    stream = tar.extractfile(member)
                    yield member.name, stream.read() if stream is not None else b""
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise _damaged(path, f"gzipped tar: {_one_line(err) or type(err).__name__}") from err


# ---------------------------------------------------------------------------------------------
# The python batches: pickled dicts {b"data": uint8 (N, 3072), b"labels": [N ints]}


def _decode_batches_archive(path: Path) -> dict[str, np.ndarray]:
    wanted = {f"{BATCHES_FOLDER}/{name}" for name in (*TRAIN_BATCHES, TEST_BATCH, META_BATCH)}
    contents = {}
    for name, data in _tar_files(path):
        name = name.removeprefix("./")
        if name in wanted:
            contents[name.rsplit("/", 1)[1]] = data

    def read(name: str) -> tuple[str, bytes]:
        if name not in contents:
            raise _damaged(path, f"no {BATCHES_FOLDER}/{name} in it")
        return f"{path} ({BATCHES_FOLDER}/{name})", contents[name]

    return _decode_batches(read, None if META_BATCH not in contents else read(META_BATCH))


def _decode_batches(
    read: Callable[[str], tuple[object, bytes]], meta: tuple[object, bytes] | None
) -> dict[str, np.ndarray]:
    """The arrays from the batch files that ``read`` returns by name, with what names each in errors."""
    if meta is not None:
        _check_meta(*meta)
    arrays = {}
    for split, names in (("train", TRAIN_BATCHES), ("test", (TEST_BATCH,))):
        images, labels = zip(*(_read_batch(*read(name)) for name in names))
        arrays[f"{split}_x"] = np.concatenate(images).reshape(-1, *IMAGE_SHAPE)
        arrays[f"{split}_y"] = np.concatenate(labels)
    return arrays


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise _damaged(path, f"unreadable: {_one_line(err)}") from err


def _read_batch(where: object, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(where, data)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise _damaged(where, f"a CIFAR-10 batch holds b'data' and b'labels', this one {keys}")
    images, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        shape = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise _damaged(where, f"b'data' is {shape}, expected uint8 (N, 3072)")
    try:
        labels = np.asarray(labels)
        valid = labels.ndim == 1 and labels.dtype.kind in "iu" and len(labels) == len(images)
    except (TypeError, ValueError):
        valid = False
    if not valid or (len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < NUM_CLASSES):
        raise _damaged(where, f"b'labels' must be {len(images)} whole numbers from 0 to {NUM_CLASSES - 1}")
    return images, labels.astype(np.int64)


def _check_meta(where: object, data: bytes) -> None:
    meta = _unpickle(where, data)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or [_text(name) for name in names] != list(CLASSES):
        raise _damaged(where, f"b'label_names' must be the standard classes {', '.join(CLASSES)}")


def _text(name: object) -> object:
    return name.decode(errors="replace") if isinstance(name, bytes) else name


def _unpickle(where: object, data: bytes) -> object:
    try:
        return _BatchUnpickler(io.BytesIO(data), where).load()
    except TaskError:
        raise
    except Exception as err:  # a malformed pickle raises any of many types: name it, in one line
        raise _damaged(where, f"not a readable pickle: {type(err).__name__}: {_one_line(err)}") from err


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of bytes use it, and only that way."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode of {type(text).__name__} as {encoding!r}")
    return text.encode("latin1")


_SAMPLE = np.zeros(1, dtype=np.uint8)
# What pickles of numpy arrays, bytes and lists need, under the names numpy 1 and 2 save them by:
# from the functions numpy itself pickles arrays with, so that no private module is imported.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _SAMPLE.__reduce__()[0],
    ("numpy._core.multiarray", "_reconstruct"): _SAMPLE.__reduce__()[0],
    ("numpy.core.numeric", "_frombuffer"): _SAMPLE.__reduce_ex__(5)[0],
    ("numpy._core.numeric", "_frombuffer"): _SAMPLE.__reduce_ex__(5)[0],
    ("_codecs", "encode"): _latin1_encode,
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch and nothing else: any global beyond numpy arrays is refused."""

    def __init__(self, stream: io.BytesIO, where: object):
        super().__init__(stream, encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str) -> object:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise TaskError(
                f"{self.where} is refused: its pickle asks for {module}.{name}, which a CIFAR-10 batch never needs; "
                "replace it with a good copy, or delete it and set PEER_DOWNLOAD=1"
            )
        return allowed


def _damaged(where: object, detail: str) -> TaskError:
    return TaskError(f"{where} is damaged ({detail}): replace it with a good copy, or delete it and set PEER_DOWNLOAD=1")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
