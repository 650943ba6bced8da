"""Tests for loading tasks: built-in datasets, user tasks, and the checks on them."""

import dataclasses
import gzip
import hashlib
import io
import random
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from peer.tasks import TASK_NAMES, Task, TaskError, fashion_mnist, load_task
from peer.tasks.fashion_mnist import load_fashion_mnist
from tests.helpers import idx_bytes, write_fashion_files

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
USER_TASK_MODULE = "tiny_user_tasks"
USER_TASK_SOURCE = """
import torch
from peer.tasks import Task

def _task(data_dir, out_features=3):
    generator = torch.Generator().manual_seed(0)
    return Task(
        name=f"tiny-{data_dir.name if data_dir else 'none'}",
        train_x=torch.randn(20, 4, generator=generator),
        train_y=torch.arange(20) % 3,
        test_x=torch.randn(6, 4, generator=generator),
        test_y=torch.arange(6) % 3,
        num_classes=3,
        make_model=lambda: torch.nn.Linear(4, out_features),
    )

def tiny(data_dir):
    return _task(data_dir)

def wrong_output_shape(data_dir):
    return _task(data_dir, out_features=5)

def returns_dict(data_dir):
    return {"train_x": None}

not_a_function = 3
"""


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep caches out of ~ and never download."""
    monkeypatch.setenv("PEER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PEER_DOWNLOAD", raising=False)


@pytest.fixture
def user_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the module of small user tasks importable for one test."""
    module_dir = tmp_path / "user_modules"
    module_dir.mkdir()
    (module_dir / f"{USER_TASK_MODULE}.py").write_text(textwrap.dedent(USER_TASK_SOURCE))
    monkeypatch.syspath_prepend(str(module_dir))
    monkeypatch.delitem(sys.modules, USER_TASK_MODULE, raising=False)


def test_task_names_are_the_builtins() -> None:
    assert TASK_NAMES == ("mnist1d", "fashion-mnist", "cifar10", "logistic", "shakespeare")


def test_mnist1d_loads_caches_and_leaves_global_rngs_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    np.random.seed(123)
    random.seed(123)
    task = load_task("mnist1d", None)
    assert np.random.randint(1 << 30) == np.random.RandomState(123).randint(1 << 30)
    assert random.random() == random.Random(123).random()

    assert task.train_x.shape == (4000, 1, 40) and task.test_x.shape == (1000, 1, 40)
    assert task.train_x.dtype == torch.float32 and task.train_y.dtype == torch.int64
    assert set(task.train_y.tolist()) == set(range(10)) and task.num_classes == 10
    assert abs(float(task.train_x.mean())) < 1e-3 and abs(float(task.train_x.std()) - 1) < 1e-3
    assert len(list((tmp_path / "cache").glob("mnist1d-*.npz"))) == 1

    import mnist1d.data

    def fail(*args: object) -> None:
        raise AssertionError("the cached dataset should have been used")

    monkeypatch.setattr(mnist1d.data, "make_dataset", fail)
    again = load_task("mnist1d", None)
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(task, field), getattr(again, field))


def test_mnist1d_regenerates_a_damaged_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import mnist1d.data

    def small_dataset(args: object) -> dict[str, np.ndarray]:
        x = np.arange(320.0).reshape(8, 40)
        return {"x": x, "y": np.arange(8), "x_test": x[:2], "y_test": np.arange(2)}

    monkeypatch.setattr(mnist1d.data, "make_dataset", small_dataset)
    cache = tmp_path / "cache"
    cache.mkdir()
    from peer.tasks.mnist1d import load_mnist1d

    load_mnist1d()
    (cached,) = cache.glob("mnist1d-*.npz")
    cached.write_bytes(b"not a zip file")
    assert load_mnist1d().train_x.shape == (8, 1, 40)
    assert list(cache.iterdir()) == [cached]


def test_mnist1d_model_has_the_standard_shape() -> None:
    from peer.tasks.mnist1d import make_mnist1d_model

    model = make_mnist1d_model()
    assert model(torch.zeros(3, 1, 40)).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) == 5210


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"the real Fashion-MNIST files are not at {SHARED_DATA}")
def test_fashion_mnist_loads_from_shared_data() -> None:
    task = load_task("fashion-mnist", SHARED_DATA)
    assert task.train_x.shape == (60000, 1, 28, 28) and task.test_x.shape == (10000, 1, 28, 28)
    assert task.train_x.dtype == torch.float32 and task.test_y.dtype == torch.int64
    assert torch.bincount(task.train_y).tolist() == [6000] * 10
    assert abs(float(task.train_x.mean())) < 1e-3 and abs(float(task.train_x.std()) - 1) < 1e-3


@pytest.mark.parametrize("subfolder", ["", "fashion-mnist"])
def test_fashion_mnist_accepts_parent_or_the_folder_itself(tmp_path: Path, subfolder: str) -> None:
    write_fashion_files(tmp_path / "data" / "fashion-mnist")
    task = load_task("fashion-mnist", tmp_path / "data" / subfolder)
    assert task.train_x.shape == (20, 1, 28, 28) and task.test_y.shape == (10,)


def test_missing_data_dir_says_to_pass_data_dir(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="does not exist: pass --data-dir"):
        load_task("fashion-mnist", tmp_path / "nowhere")


def test_no_data_dir_says_to_pass_data_dir() -> None:
    with pytest.raises(TaskError, match="pass --data-dir .* PEER_DOWNLOAD=1"):
        load_task("fashion-mnist", None)


def test_missing_file_is_named(tmp_path: Path) -> None:
    write_fashion_files(tmp_path / "fashion-mnist")
    (tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(TaskError, match=r"missing from .*fashion-mnist \(t10k-labels-idx1-ubyte.gz\): pass --data-dir"):
        load_task("fashion-mnist", tmp_path)


@pytest.mark.parametrize(
    ("damage", "detail"),
    [
        (lambda data: data[: len(data) // 2], "gzip"),  # a download cut short
        (lambda data: gzip.compress(b"\x08\x03\x00\x00" + b"\x00" * 40), "magic number"),
        (lambda data: gzip.compress(gzip.decompress(data)[:-7]), "data bytes"),
        (lambda data: gzip.compress(idx_bytes(np.zeros((20, 27, 27)))), "shape"),
    ],
)
def test_damaged_idx_file_is_named(tmp_path: Path, damage, detail: str) -> None:
    written = write_fashion_files(tmp_path / "fashion-mnist")
    damaged = tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    damaged.write_bytes(damage(written[damaged.name]))
    with pytest.raises(TaskError, match=f"train-images-idx3-ubyte.gz is damaged .*{detail}"):
        load_task("fashion-mnist", tmp_path)


def test_label_count_must_match_image_count(tmp_path: Path) -> None:
    write_fashion_files(tmp_path / "fashion-mnist")
    labels = tmp_path / "fashion-mnist" / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(19))))
    with pytest.raises(TaskError, match="train-labels-idx1-ubyte.gz is damaged"):
        load_task("fashion-mnist", tmp_path)


def test_download_fetches_and_checks_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No network in tests: urlopen serves locally made files whose hashes stand in for the published ones.
    served = write_fashion_files(tmp_path / "source")
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in served.items()}
    monkeypatch.setattr(fashion_mnist, "SHA256", digests)
    requested = []

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        requested.append(url)
        return io.BytesIO(served[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setenv("PEER_DOWNLOAD", "1")
    task = load_task("fashion-mnist", tmp_path / "data")
    assert task.train_x.shape == (20, 1, 28, 28)
    assert sorted(p.name for p in (tmp_path / "data" / "fashion-mnist").iterdir()) == sorted(served)
    assert all(url.startswith(fashion_mnist.DOWNLOAD_URL) for url in requested) and len(requested) == 4


def test_download_rejects_a_wrong_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"tampered"))
    monkeypatch.setenv("PEER_DOWNLOAD", "1")
    with pytest.raises(TaskError, match="does not match its published SHA-256"):
        load_fashion_mnist(tmp_path)
    assert not any((tmp_path / "fashion-mnist").iterdir())


def test_unknown_task_lists_the_choices() -> None:
    message = "unknown task 'cifar': use one of mnist1d, fashion-mnist, cifar10, logistic, shakespeare, mnist1d:SAMPLES, or"
    with pytest.raises(TaskError, match=message):
        load_task("cifar", None)


def test_mnist1d_can_be_generated_larger() -> None:
    task = load_task("mnist1d:600")
    assert task.name == "mnist1d:600"
    assert (len(task.train_y), len(task.test_y)) == (480, 120)
    assert task.train_x.shape[1:] == load_task("mnist1d").train_x.shape[1:]


@pytest.mark.parametrize("spec", ["mnist1d:", "mnist1d:many", "mnist1d:10", "mnist1d:-5", "mnist1d:2000000"])
def test_a_bad_mnist1d_size_says_what_is_allowed(spec: str) -> None:
    with pytest.raises(TaskError, match="whole number of sequences from 100 to 1000000"):
        load_task(spec)


@pytest.mark.usefixtures("user_tasks")
def test_user_task_is_loaded_with_the_data_dir(tmp_path: Path) -> None:
    task = load_task(f"{USER_TASK_MODULE}:tiny", tmp_path / "mydata")
    assert isinstance(task, Task) and task.name == "tiny-mydata"


@pytest.mark.usefixtures("user_tasks")
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_for_peer_tests:tiny", "cannot import task module 'no_such_module_for_peer_tests'"),
        (f"{USER_TASK_MODULE}:missing", "has no function 'missing': define def FUNCTION"),
        (f"{USER_TASK_MODULE}:not_a_function", "has no function 'not_a_function'"),
        (f"{USER_TASK_MODULE}:returns_dict", "returned dict, but it must be def FUNCTION.*-> peer.tasks.Task"),
        (f"{USER_TASK_MODULE}:wrong_output_shape", r"model must output shape \(2, 3\).*got \(2, 5\)"),
        (f"{USER_TASK_MODULE}:", "must look like module:function"),
        (":tiny", "must look like module:function"),
    ],
)
def test_bad_user_tasks_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        load_task(spec, None)


def tiny_task(**changes: object) -> Task:
    task = Task(
        name="tiny",
        train_x=torch.zeros(6, 4),
        train_y=torch.tensor([0, 1, 2, 0, 1, 2]),
        test_x=torch.zeros(3, 4),
        test_y=torch.tensor([0, 1, 2]),
        num_classes=3,
        make_model=lambda: torch.nn.Linear(4, 3),
    )
    return dataclasses.replace(task, **changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train_x": torch.zeros(6, 4, dtype=torch.float64)}, "train_x must be float32"),
        ({"test_y": torch.tensor([0.0, 1.0, 2.0])}, "test_y must be int64"),
        ({"train_y": torch.tensor([0, 1, 2, 0, 1])}, "6 samples but train_y has 5 labels"),
        ({"train_y": torch.tensor([0, 1, 2, 0, 1, 3])}, r"train_y must lie in \[0, 3\)"),
        ({"test_y": torch.tensor([-1, 1, 2])}, r"test_y must lie in \[0, 3\)"),
        ({"test_x": torch.zeros(0, 4), "test_y": torch.zeros(0, dtype=torch.int64)}, "test set is empty"),
        ({"train_x": torch.full((6, 4), float("nan"))}, "train_x contains NaN"),
        ({"test_x": torch.zeros(3, 5)}, "train and test samples differ in shape"),
        ({"num_classes": 1}, "num_classes must be an int >= 2"),
        ({"make_model": lambda: "model"}, "make_model\\(\\) must return a torch.nn.Module"),
        ({"make_model": lambda: torch.nn.Linear(7, 3)}, r"model fails on input of shape \(2, 4\)"),
    ],
)
def test_validate_rejects_malformed_tasks(changes: dict, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        tiny_task(**changes).validate()


def test_validate_does_not_consume_the_callers_torch_seed() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    tiny_task().validate()
    assert torch.equal(torch.rand(3), expected)
