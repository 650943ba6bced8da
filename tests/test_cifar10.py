"""Tests for the CIFAR-10 task: its two layouts of files, the uint8 cache, downloads, errors and the model."""

import codecs
import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from peer.tasks import TaskError, cifar10, load_task
from peer.tasks.augment import CropAndFlip
from peer.tasks.cifar10 import CLASSES, load_cifar10, make_cifar10_model

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_TARBALL = SHARED_DATA / "cifar10" / "cifar10_jpeg.tar.gz"
TRAIN_PER_CLASS, TEST_PER_CLASS = 2, 1


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep caches out of ~ and never download."""
    monkeypatch.setenv("PEER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PEER_DOWNLOAD", raising=False)


def small_images(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """per_class images of each class in class order, (N, 3, 32, 32) uint8: a flat colour of the class
    with a faint ramp, smooth enough that JPEG keeps every pixel within a few levels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    colours = rng.integers(40, 216, size=(10, 3))
    ramp = np.linspace(0, 24, 32).astype(np.int64)
    images = colours[labels][:, :, None, None] + ramp[None, None, :, None] + rng.integers(0, 8, (len(labels), 1, 1, 1))
    return np.broadcast_to(images, (len(labels), 3, 32, 32)).astype(np.uint8), labels.astype(np.int64)


SPLITS = {"train": small_images(TRAIN_PER_CLASS, 0), "test": small_images(TEST_PER_CLASS, 1)}


def jpeg_bytes(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(out, format="JPEG", quality=95)
    return out.getvalue()


def tar_gz(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def jpeg_files(images_of=None) -> dict[str, bytes]:
    """The tarball's members, train/<class>/NNNN.jpg and test/<class>/NNNN.jpg, by name."""
    files = {}
    for split, (images, labels) in SPLITS.items():
        for index, (image, label) in enumerate(zip(images, labels)):
            files[f"{split}/{CLASSES[label]}/{index:04d}.jpg"] = jpeg_bytes(image if images_of is None else images_of(image))
    return files


def write_jpeg_tarball(folder: Path, files: dict[str, bytes] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cifar10_jpeg.tar.gz"
    path.write_bytes(tar_gz(jpeg_files() if files is None else files))
    return path


def batch_bytes(images: np.ndarray, labels: np.ndarray, protocol: int = 2) -> bytes:
    batch = {b"batch_label": b"a batch", b"labels": labels.tolist(), b"data": images.reshape(len(images), -1),
             b"filenames": [b"%d.png" % i for i in range(len(images))]}
    return pickle.dumps(batch, protocol=protocol)


def batch_files(protocol: int = 2) -> dict[str, bytes]:
    """The python layout's files by name: five training batches, the test batch and the class names."""
    images, labels = SPLITS["train"]
    parts = np.array_split(np.arange(len(labels)), 5)
    files = {f"data_batch_{i + 1}": batch_bytes(images[part], labels[part], protocol) for i, part in enumerate(parts)}
    files["test_batch"] = batch_bytes(*SPLITS["test"], protocol)
    meta = {b"label_names": [name.encode() for name in CLASSES], b"num_vis": 3072}
    files["batches.meta"] = pickle.dumps(meta, protocol=protocol)
    return files


def write_batches_folder(folder: Path, files: dict[str, bytes] | None = None) -> Path:
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True, exist_ok=True)
    for name, data in (batch_files() if files is None else files).items():
        (batches / name).write_bytes(data)
    return batches


def one_line_error(data_dir: Path | None) -> str:
    with pytest.raises(TaskError) as raised:
        load_task("cifar10", data_dir)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_the_jpeg_tarball_gives_uint8_images_in_the_standard_class_order(tmp_path: Path) -> None:
    write_jpeg_tarball(tmp_path / "cifar10")
    task = load_task("cifar10", tmp_path)
    assert task.name == "cifar10" and task.num_classes == 10
    for split, (images, labels) in SPLITS.items():
        x, y = getattr(task, f"{split}_x"), getattr(task, f"{split}_y")
        assert x.dtype == torch.uint8 and x.shape == (len(labels), 3, 32, 32)
        assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
        assert int((x.to(torch.int16) - torch.from_numpy(images).to(torch.int16)).abs().max()) <= 4  # JPEG is lossy


@pytest.mark.parametrize("protocol", [2, 5])
def test_the_python_batches_give_exactly_the_images_and_labels_written(tmp_path: Path, protocol: int) -> None:
    write_batches_folder(tmp_path, batch_files(protocol))
    task = load_task("cifar10", tmp_path)
    for split, (images, labels) in SPLITS.items():
        assert torch.equal(getattr(task, f"{split}_x"), torch.from_numpy(images))
        assert torch.equal(getattr(task, f"{split}_y"), torch.from_numpy(labels))


def test_the_tarball_the_batches_folder_and_the_python_archive_give_the_same_labels_and_shapes(tmp_path: Path) -> None:
    write_jpeg_tarball(tmp_path / "jpeg")
    write_batches_folder(tmp_path / "folder")
    archive = {f"cifar-10-batches-py/{name}": data for name, data in batch_files().items()}
    (tmp_path / "archive").mkdir()
    (tmp_path / "archive" / "cifar-10-python.tar.gz").write_bytes(tar_gz(archive))
    jpeg, folder, packed = (load_cifar10(tmp_path / name) for name in ("jpeg", "folder", "archive"))
    for field in ("train_x", "test_x"):
        assert getattr(jpeg, field).shape == getattr(folder, field).shape
        assert torch.equal(getattr(folder, field), getattr(packed, field))
    for field in ("train_y", "test_y"):
        assert torch.equal(getattr(jpeg, field), getattr(folder, field))
        assert torch.equal(getattr(folder, field), getattr(packed, field))


def test_the_tarball_is_used_before_the_python_batches_in_the_same_folder(tmp_path: Path) -> None:
    write_jpeg_tarball(tmp_path)
    write_batches_folder(tmp_path, {name: b"never read" for name in batch_files()})
    assert load_cifar10(tmp_path).train_x.shape == (20, 3, 32, 32)


@pytest.mark.parametrize("subfolder", ["", "cifar10"])
def test_cifar10_accepts_parent_or_the_folder_itself(tmp_path: Path, subfolder: str) -> None:
    write_jpeg_tarball(tmp_path / "data" / "cifar10")
    assert load_task("cifar10", tmp_path / "data" / subfolder).test_y.shape == (10,)


def test_without_data_dir_the_files_are_read_from_the_cache_folder(tmp_path: Path) -> None:
    write_batches_folder(tmp_path / "cache" / "cifar10")
    assert load_task("cifar10", None).train_y.shape == (20,)


def test_the_first_load_writes_one_uint8_cache_and_the_next_load_reads_it_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_jpeg_tarball(tmp_path)
    first = load_cifar10(tmp_path)
    (cached,) = (tmp_path / "cache").glob("cifar10-*.npz")
    assert len(cached.name) == len("cifar10-") + 16 + len(".npz")
    with np.load(cached) as stored:
        assert stored["train_x"].dtype == np.uint8 and stored["train_y"].dtype == np.int64

    def fail(*args: object) -> None:
        raise AssertionError("the cached images should have been used")

    monkeypatch.setattr(cifar10, "_tar_files", fail)
    again = load_cifar10(tmp_path)
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, field), getattr(again, field))
    assert list((tmp_path / "cache").iterdir()) == [cached]


def test_a_changed_tarball_is_decoded_into_a_cache_of_its_own(tmp_path: Path) -> None:
    write_jpeg_tarball(tmp_path)
    first = load_cifar10(tmp_path)
    write_jpeg_tarball(tmp_path, jpeg_files(images_of=lambda image: 255 - image))
    second = load_cifar10(tmp_path)
    assert len(list((tmp_path / "cache").glob("cifar10-*.npz"))) == 2
    assert not torch.equal(first.train_x, second.train_x) and torch.equal(first.train_y, second.train_y)


@pytest.mark.parametrize("damage", [b"not a zip file", None])
def test_a_damaged_cache_is_decoded_afresh(tmp_path: Path, damage: bytes | None) -> None:
    write_jpeg_tarball(tmp_path)
    first = load_cifar10(tmp_path)
    (cached,) = (tmp_path / "cache").glob("cifar10-*.npz")
    if damage is None:  # a readable archive whose arrays are not images
        np.savez(cached, train_x=np.zeros(3), train_y=np.zeros(3), test_x=np.zeros(3), test_y=np.zeros(3))
    else:
        cached.write_bytes(damage)
    assert torch.equal(load_cifar10(tmp_path).train_x, first.train_x)
    assert list((tmp_path / "cache").iterdir()) == [cached]
    with np.load(cached) as stored:
        assert stored["train_x"].shape == (20, 3, 32, 32)


def test_no_files_names_the_data_dir_the_files_looked_for_and_the_fix(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    message = one_line_error(tmp_path / "data")
    assert f"missing from {tmp_path / 'data' / 'cifar10'} or {tmp_path / 'data'}" in message
    assert "cifar10_jpeg.tar.gz, cifar-10-batches-py/ or cifar-10-python.tar.gz" in message
    assert message.endswith("pass --data-dir pointing at the folder that contains cifar10/ (e.g. ~/data), "
                            "or give --download (or set PEER_DOWNLOAD=1) to download it")


def test_no_data_dir_and_an_empty_cache_name_the_cache_folder_and_the_fix(tmp_path: Path) -> None:
    message = one_line_error(None)
    assert f"none of them in {tmp_path / 'cache' / 'cifar10'}: pass --data-dir" in message
    assert "PEER_DOWNLOAD=1" in message


def test_a_missing_data_dir_says_so(tmp_path: Path) -> None:
    assert f"data directory {tmp_path / 'nowhere'} does not exist: pass --data-dir" in one_line_error(tmp_path / "nowhere")


def test_a_batches_folder_without_the_test_batch_names_it(tmp_path: Path) -> None:
    files = batch_files()
    del files["test_batch"]
    write_batches_folder(tmp_path / "cifar10", files)
    message = one_line_error(tmp_path)
    assert f"missing from {tmp_path / 'cifar10' / 'cifar-10-batches-py'} (test_batch): pass --data-dir" in message


def _replaced(files: dict[str, bytes], name: str, data: bytes) -> dict[str, bytes]:
    return {**files, name: data}


def _tarball_cut_short() -> dict[str, bytes] | bytes:
    data = tar_gz(jpeg_files())
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("contents", "detail"),
    [
        (_tarball_cut_short, "gzipped tar"),
        (lambda: b"plain bytes, not gzip", "gzipped tar"),
        (lambda: {name: data for name, data in jpeg_files().items() if name.startswith("test/")}, "no train/<class>/ images"),
        (lambda: _replaced(jpeg_files(), "train/cat/0007.jpg", jpeg_bytes(np.zeros((3, 31, 32), np.uint8))),
         "train/cat/0007.jpg is 32x31, expected 32x32"),
        (lambda: _replaced(jpeg_files(), "train/kitten/0000.jpg", jpeg_bytes(np.zeros((3, 32, 32), np.uint8))),
         "class folder train/kitten/ is not one of airplane, automobile"),
        (lambda: _replaced(jpeg_files(), "test/dog/0003.jpg", b"not a jpeg"), "test/dog/0003.jpg is not a readable image"),
    ],
)
def test_a_damaged_tarball_is_named_in_one_line(tmp_path: Path, contents, detail: str) -> None:
    made = contents()
    path = tmp_path / "cifar10_jpeg.tar.gz"
    path.write_bytes(made if isinstance(made, bytes) else tar_gz(made))
    message = one_line_error(tmp_path)
    assert message.startswith(f"{path} is damaged (") and detail in message
    assert message.endswith("replace it with a good copy, or delete it and set PEER_DOWNLOAD=1")


@pytest.mark.parametrize(
    ("name", "data", "detail"),
    [
        ("data_batch_3", batch_bytes(np.zeros((2, 3, 32, 31), np.uint8), np.zeros(2, int)), "b'data' is uint8 (2, 2976)"),
        ("data_batch_3", batch_bytes(np.zeros((2, 3, 32, 32), np.float32), np.zeros(2, int)), "b'data' is float32"),
        ("data_batch_1", pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), "holds b'data' and b'labels'"),
        ("test_batch", batch_bytes(np.zeros((2, 3, 32, 32), np.uint8), np.zeros(3)), "b'labels' must be 2 whole numbers"),
        ("test_batch", batch_bytes(np.zeros((2, 3, 32, 32), np.uint8), np.array([0, 10])), "from 0 to 9"),
        ("data_batch_5", pickle.dumps([1, 2, 3]), "this one list"),
        ("data_batch_2", b"\x80\x02not a pickle", "not a readable pickle"),
        ("batches.meta", pickle.dumps({b"label_names": [b"cat", b"dog"]}), "must be the standard classes"),
    ],
)
def test_a_damaged_batch_is_named_in_one_line(tmp_path: Path, name: str, data: bytes, detail: str) -> None:
    write_batches_folder(tmp_path, _replaced(batch_files(), name, data))
    message = one_line_error(tmp_path)
    assert message.startswith(f"{tmp_path / 'cifar-10-batches-py' / name} is damaged (") and detail in message


def test_a_damaged_python_archive_names_the_archive_and_the_batch(tmp_path: Path) -> None:
    files = {f"cifar-10-batches-py/{name}": data for name, data in batch_files().items()}
    files["cifar-10-batches-py/data_batch_4"] = b"garbage"
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(tar_gz(files))
    message = one_line_error(tmp_path)
    assert message.startswith(f"{tmp_path / 'cifar-10-python.tar.gz'} (cifar-10-batches-py/data_batch_4) is damaged")
    del files["cifar-10-batches-py/data_batch_4"]
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(tar_gz(files))
    assert "(no cifar-10-batches-py/data_batch_4 in it)" in one_line_error(tmp_path)


class _RunsACommand:
    """A pickle that, unpickled without restriction, would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, 5])
def test_a_batch_asking_for_a_forbidden_global_is_refused_without_running_it(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "ran"
    evil = pickle.dumps({b"data": _RunsACommand(marker), b"labels": [0]}, protocol=protocol)
    write_batches_folder(tmp_path, _replaced(batch_files(), "data_batch_2", evil))
    message = one_line_error(tmp_path)
    assert message.startswith(f"{tmp_path / 'cifar-10-batches-py' / 'data_batch_2'} is refused: its pickle asks for ")
    assert "system, which a CIFAR-10 batch never needs" in message
    assert not marker.exists()


class _EncodesAs:
    def __init__(self, encoding: str):
        self.encoding = encoding

    def __reduce__(self):
        return codecs.encode, ("text", self.encoding)


def test_a_pickle_may_not_use_codecs_beyond_latin1(tmp_path: Path) -> None:
    # Protocol 2 writes bytes as _codecs.encode(text, "latin1"); any other use of it is refused.
    evil = pickle.dumps({b"data": _EncodesAs("rot13"), b"labels": [0]}, protocol=2)
    write_batches_folder(tmp_path, _replaced(batch_files(), "test_batch", evil))
    assert "is damaged (not a readable pickle: UnpicklingError: _codecs.encode of str as 'rot13')" in one_line_error(tmp_path)


def test_download_without_torchvision_fetches_the_archive_and_checks_its_md5(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No network in tests: urlopen serves a locally made archive whose MD5 stands in for the published one.
    archive = tar_gz({f"cifar-10-batches-py/{name}": data for name, data in batch_files().items()})
    monkeypatch.setattr(cifar10, "_torchvision_datasets", lambda: None)
    monkeypatch.setattr(cifar10, "DOWNLOAD_MD5", hashlib.md5(archive).hexdigest())
    requested = []

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        requested.append(url)
        return io.BytesIO(archive)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setenv("PEER_DOWNLOAD", "1")
    task = load_task("cifar10", tmp_path / "data")
    assert requested == [cifar10.DOWNLOAD_URL] and task.train_x.shape == (20, 3, 32, 32)
    assert [p.name for p in (tmp_path / "data" / "cifar10").iterdir()] == ["cifar-10-python.tar.gz"]
    load_task("cifar10", tmp_path / "data")
    assert len(requested) == 1


def test_download_rejects_a_wrong_md5_and_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cifar10, "_torchvision_datasets", lambda: None)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"tampered"))
    monkeypatch.setenv("PEER_DOWNLOAD", "1")
    assert "does not match its published MD5" in one_line_error(tmp_path)
    assert not any((tmp_path / "cifar10").iterdir())


def test_a_failed_download_says_so_and_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(url: str, timeout: float) -> io.BytesIO:
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(cifar10, "_torchvision_datasets", lambda: None)
    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    monkeypatch.setenv("PEER_DOWNLOAD", "1")
    message = one_line_error(tmp_path)
    assert message.startswith(f"downloading {cifar10.DOWNLOAD_URL} failed (<urlopen error no route to host>): ")
    assert message.endswith(f"put cifar10_jpeg.tar.gz, cifar-10-batches-py/ or cifar-10-python.tar.gz in {tmp_path / 'cifar10'}")
    assert not any((tmp_path / "cifar10").iterdir())


def test_download_uses_torchvision_when_it_is_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class FakeDatasets:
        @staticmethod
        def CIFAR10(root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            write_batches_folder(Path(root))

    monkeypatch.setattr(cifar10, "_torchvision_datasets", lambda: FakeDatasets)
    monkeypatch.setenv("PEER_DOWNLOAD", "1")
    assert load_task("cifar10", None).test_y.shape == (10,)
    assert calls == [(str(tmp_path / "cache" / "cifar10"), True, True), (str(tmp_path / "cache" / "cifar10"), False, True)]


def test_the_task_uses_the_cifar10_model_sgd_with_weight_decay_and_crops_and_flips(tmp_path: Path) -> None:
    write_jpeg_tarball(tmp_path)
    task = load_task("cifar10", tmp_path)  # validated: the model takes the uint8 images
    assert task.optimizer == "sgd" and task.learning_rate == 0.05 and task.weight_decay == 5e-4
    assert isinstance(task.augmentation, CropAndFlip) and task.augmentation.padding == 4
    assert task.make_model is make_cifar10_model
    generator = torch.Generator().manual_seed(0)
    changed = task.augmentation.apply(task.train_x[:4], task.augmentation.draw(4, generator))
    assert changed.dtype == torch.uint8 and changed.shape == (4, 3, 32, 32)


def test_the_model_is_batchable_has_no_buffers_and_standardises_uint8_images() -> None:
    from peer.sim.batched import batching_refusal

    model = make_cifar10_model()
    images = torch.from_numpy(SPLITS["train"][0])
    assert batching_refusal(model, images[:4]) is None
    assert list(model.buffers()) == [] and not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == 168_746
    assert model(images[:3]).shape == (3, 10)
    mean = torch.tensor(cifar10.CIFAR10_MEAN).view(1, 3, 1, 1) * 255
    assert float(model[0](mean.round().to(torch.uint8)).abs().max()) < 0.01


@pytest.mark.skipif(not SHARED_TARBALL.is_file(), reason=f"the real CIFAR-10 tarball is not at {SHARED_TARBALL}")
def test_cifar10_loads_from_shared_data() -> None:
    task = load_task("cifar10", SHARED_DATA)
    assert task.train_x.shape == (50000, 3, 32, 32) and task.test_x.shape == (10000, 3, 32, 32)
    assert task.train_x.dtype == torch.uint8 and task.test_y.dtype == torch.int64
    assert torch.bincount(task.train_y).tolist() == [5000] * 10 and torch.bincount(task.test_y).tolist() == [1000] * 10
    mean = task.train_x.to(torch.float64).mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor([0.4913, 0.4821, 0.4465], dtype=torch.float64), atol=0.01)
