"""Tests for the shakespeare task: parsing speaker turns, windows, splits, errors, and its character GPT."""

import collections
import hashlib
import io
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from peer.config import SimulationConfig
from peer.sim.batched import BatchedTraining, StackedTrainer, batching_refusal
from peer.simulate import build_trainers
from peer.tasks import TASK_NAMES, PartitionError, TaskError, load_task, partition, shakespeare
from peer.tasks.gpt import make_char_gpt
from peer.tasks.shakespeare import encode, load_shakespeare, speaker_turns
from peer.trainer import Trainer, label_losses

SHARED_FILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
SPEAKERS = ("ALICE", "BOB", "DAVE", "CAROL")  # in order of their first turn: their group indices
# Each speaker's stream is the concatenation of its turns: ALICE 430 characters, BOB 300, DAVE and
# CAROL 210, EVE 40, so (length - 65) // 32 + 1 windows each: 12, 8, 5, 5, and none for EVE.
WINDOWS = (12, 8, 5, 5)
SCRIPT = [  # (speaker, body length); None: a paragraph of 158 '#' that is no turn
    ("ALICE", 150), ("BOB", 150), ("DAVE", 62), ("ALICE", 140), ("CAROL", 100), (None, 158),
    ("BOB", 136), ("EVE", 33), ("DAVE", 62), ("ALICE", 113), ("CAROL", 92), ("DAVE", 62),
]
TRAIN_CHARACTERS, TEST_CHARACTERS = 1350, 150  # the held-out tenth begins with ZED's turn


def body(letter: str, length: int) -> str:
    """length characters of words of letter, eight to a word and four words to a line."""
    chars = ["\n" if i % 32 == 31 else " " if i % 8 == 7 else letter for i in range(length - 1)]
    return "".join(chars) + letter


def turn(speaker: str, length: int) -> str:
    return f"{speaker}:\n{body(speaker[0].lower(), length)}\n\n"


def synthetic_text() -> tuple[str, dict[str, str]]:
    """The text of a small play, and each speaker's stream (its turns, in order)."""
    streams: dict[str, str] = collections.defaultdict(str)
    parts = []
    for speaker, length in SCRIPT:
        if speaker is None:
            parts.append(body("#", length) + "\n\n")
            continue
        parts.append(turn(speaker, length))
        streams[speaker] += parts[-1]
    held_out = turn("ZED", TEST_CHARACTERS - 7)
    text = "".join(parts) + held_out
    assert (len(text), int(len(text) * 0.9), len(held_out)) == (1500, TRAIN_CHARACTERS, TEST_CHARACTERS)
    return text, dict(streams)


TEXT, STREAMS = synthetic_text()
VOCABULARY = "\n #:ABCDEILORVZabcdez"


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep caches out of ~ and never download."""
    monkeypatch.setenv("PEER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PEER_DOWNLOAD", raising=False)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "data" / "tinyshakespeare").mkdir(parents=True)
    (tmp_path / "data" / "tinyshakespeare" / "input.txt").write_text(TEXT, encoding="utf-8")
    return tmp_path / "data"


def decoded(rows: torch.Tensor) -> list[str]:
    return ["".join(VOCABULARY[i] for i in row.tolist()) for row in rows]


def test_shakespeare_is_a_builtin_task_that_validates(data_dir: Path) -> None:
    assert "shakespeare" in TASK_NAMES
    task = load_task("shakespeare", data_dir, peers=2)  # load_task validates it
    assert task.name == "shakespeare" and task.optimizer == "adamw"
    assert (task.learning_rate, task.weight_decay) == (1e-3, 0.1)
    task.validate()


def test_the_vocabulary_is_the_sorted_distinct_characters_of_the_file(data_dir: Path) -> None:
    vocabulary, codes = encode(TEXT)
    assert vocabulary == VOCABULARY == "".join(sorted(set(TEXT)))
    assert "".join(vocabulary[i] for i in codes.tolist()) == TEXT
    assert load_shakespeare(data_dir).num_classes == len(VOCABULARY) == 21


def test_training_windows_are_65_characters_of_one_speakers_stream_every_32(data_dir: Path) -> None:
    task = load_shakespeare(data_dir)
    assert task.train_x.shape == task.train_y.shape == (sum(WINDOWS), 64)
    assert task.train_x.dtype == task.train_y.dtype == task.groups.dtype == torch.int64
    assert torch.bincount(task.groups).tolist() == list(WINDOWS)
    assert torch.equal(task.partition_labels(), task.groups)
    inputs, targets = decoded(task.train_x), decoded(task.train_y)
    for row, (x, y) in enumerate(zip(inputs, targets)):
        speaker = SPEAKERS[int(task.groups[row])]
        start = 32 * (row - sum(WINDOWS[: SPEAKERS.index(speaker)]))
        window = STREAMS[speaker][start : start + 65]
        assert (x, y) == (window[:-1], window[1:])  # y is x one character later
        assert "#" not in x  # the paragraph that is no turn is left out
    # The first window of a speaker starts with its name, so the model learns who speaks.
    assert inputs[0].startswith("ALICE:\naaaaaaa aaaaaaa")


def test_the_test_split_is_the_last_tenth_in_windows_whose_targets_tile_it(data_dir: Path) -> None:
    task = load_shakespeare(data_dir)
    held_out = TEXT[TRAIN_CHARACTERS:]
    assert held_out.startswith("ZED:\n") and task.test_x.shape == task.test_y.shape == (2, 64)
    assert decoded(task.test_x) == [held_out[:64], held_out[64:128]]
    assert decoded(task.test_y) == [held_out[1:65], held_out[65:129]]


@pytest.mark.parametrize(
    ("peers", "speaker_owners"),
    [
        (1, [0, 0, 0, 0]),
        # ALICE (12 windows) to 0, BOB (8) to 1, CAROL (5, before DAVE by name) to 1 (8 < 12), DAVE to 0 (12 < 13).
        (2, [0, 1, 0, 1]),
        (3, [0, 1, 2, 2]),
        (4, [0, 1, 3, 2]),
    ],
)
def test_the_natural_split_gives_whole_speakers_largest_first_to_the_least_loaded_peer(
    data_dir: Path, peers: int, speaker_owners: list[int]
) -> None:
    task = load_task("shakespeare", data_dir, peers=peers)
    assert torch.equal(task.owners, torch.tensor(speaker_owners)[task.groups])
    loads = torch.bincount(task.owners, minlength=peers).tolist()
    assert loads == {1: [30], 2: [17, 13], 3: [12, 8, 10], 4: [12, 8, 5, 5]}[peers]
    parts = partition(task.partition_labels(), peers, "natural", seed=0, owners=task.owners)
    assert [len(part) for part in parts] == loads


def test_without_peers_there_is_no_natural_split(data_dir: Path) -> None:
    assert load_shakespeare(data_dir, None).owners is None


def test_more_peers_than_speakers_have_no_natural_split_but_the_other_partitions_work(data_dir: Path) -> None:
    task = load_task("shakespeare", data_dir, peers=5)
    assert task.owners is None
    with pytest.raises(PartitionError, match="no natural split for 5 peers .* use fewer peers"):
        partition(task.partition_labels(), 5, "natural", 0, owners=task.owners)
    assert len(partition(task.partition_labels(), 5, "iid", 0, owners=task.owners)) == 5


def test_turns_run_from_a_name_line_after_a_blank_line_to_the_next_paragraph() -> None:
    text = "A:\nhi:\nthere\n\n\nnot a turn\nB:\n\nB:\nyes\n"
    # "B:" after "not a turn" follows no blank line: it is no header, and that paragraph no turn.
    assert speaker_turns(text) == [("A", 0, 15), ("B", 30, 37)]
    assert text[:15] == "A:\nhi:\nthere\n\n\n" and text[30:37] == "B:\nyes\n"


def test_the_data_dir_may_be_the_folder_holding_the_file(data_dir: Path) -> None:
    assert load_shakespeare(data_dir / "tinyshakespeare").train_x.shape == (30, 64)


def test_a_missing_file_is_named(data_dir: Path) -> None:
    (data_dir / "tinyshakespeare" / "input.txt").unlink()
    with pytest.raises(TaskError, match=r"tinyshakespeare/input.txt is missing: pass --data-dir .* PEER_DOWNLOAD=1"):
        load_task("shakespeare", data_dir)


def test_no_data_dir_says_to_pass_one_or_download() -> None:
    with pytest.raises(TaskError, match="shakespeare needs tinyshakespeare/input.txt.*pass --data-dir .*PEER_DOWNLOAD=1"):
        load_task("shakespeare", None)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "holds 0 characters, too few: the shakespeare task needs at least 650"),
        (b"A:\n" + b"\xff" * 1000, "is not UTF-8 text"),
        (b"no speaker here\n" * 70, "has no speaker with 65 characters of turns"),
        (b"x" * 1000, "holds only one distinct character"),
    ],
)
def test_a_bad_file_is_named_with_what_is_wrong(data_dir: Path, content: bytes, message: str) -> None:
    path = data_dir / "tinyshakespeare" / "input.txt"
    path.write_bytes(content)
    with pytest.raises(TaskError, match=f"^{re.escape(str(path))}.*{message}"):
        load_task("shakespeare", data_dir)


def test_download_keeps_the_file_only_when_its_checksum_matches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # No network in tests: urlopen serves the synthetic text, whose hash stands in for the published one.
    payload = TEXT.encode()
    requested = []

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        requested.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setenv("PEER_DOWNLOAD", "1")
    with pytest.raises(TaskError, match="does not match its published SHA-256"):
        load_task("shakespeare", None)
    folder = tmp_path / "cache" / "tinyshakespeare"
    assert not any(folder.iterdir())
    monkeypatch.setattr(shakespeare, "SHA256", hashlib.sha256(payload).hexdigest())
    assert load_task("shakespeare", None).train_x.shape == (30, 64)
    assert [p.name for p in folder.iterdir()] == ["input.txt"] and (folder / "input.txt").read_bytes() == payload
    assert requested == [shakespeare.DOWNLOAD_URL] * 2


def test_the_full_model_has_809856_parameters_and_predicts_every_position() -> None:
    model = make_char_gpt(65, context=64, layers=4, heads=4, width=128)
    assert sum(p.numel() for p in model.parameters()) == 809_856
    assert list(model.buffers()) == []
    ids = torch.randint(0, 65, (3, 64))
    assert model(ids).shape == (3, 64, 65) and model(ids[:, :10]).shape == (3, 10, 65)


def test_the_model_sees_no_later_position() -> None:
    torch.manual_seed(0)
    model = make_char_gpt(20, context=64, layers=2, heads=2, width=32)
    ids = torch.randint(0, 20, (2, 64))
    changed = ids.clone()
    changed[:, 40:] = (changed[:, 40:] + 1) % 20
    with torch.no_grad():
        before, after = model(ids), model(changed)
    assert torch.allclose(before[:, :40], after[:, :40], atol=1e-6)
    assert not torch.allclose(before[:, 40:], after[:, 40:], atol=1e-6)


def test_the_model_trains_batched(data_dir: Path) -> None:
    task = load_shakespeare(data_dir)
    assert batching_refusal(task.make_model(), task.train_x[:4]) is None


def test_the_batched_engine_trains_shakespeare_peers_as_they_train_alone(data_dir: Path) -> None:
    task = load_task("shakespeare", data_dir, peers=2)
    config = SimulationConfig(
        peers=2, partition="natural", task="shakespeare", batch_size=8, optimizer="adamw", lr=1e-3, weight_decay=0.1
    )
    alone = build_trainers(config, task, torch.device("cpu"))
    stacked = build_trainers(config, task, torch.device("cpu"), trainer_class=StackedTrainer)
    engine = BatchedTraining(stacked, chunk=2)
    for _ in range(2):
        losses_alone = [trainer.train(2) for trainer in alone]
        assert engine.run([(trainer, 2) for trainer in stacked]) == pytest.approx(losses_alone, rel=1e-4)
    for one, other in zip(alone, stacked):
        for name, tensor in one.state().items():
            torch.testing.assert_close(other.state()[name], tensor, atol=2e-5, rtol=1e-4)
    engine.close()


def test_a_few_adamw_steps_lower_the_training_loss(data_dir: Path) -> None:
    task = load_shakespeare(data_dir)
    torch.manual_seed(0)
    trainer = Trainer(
        task.make_model(), (task.train_x, task.train_y), (task.test_x, task.test_y),
        lr=task.learning_rate, momentum=0.0, weight_decay=task.weight_decay, batch_size=8, seed=0,
        device=torch.device("cpu"), optimizer=task.optimizer,
    )

    def training_loss() -> float:
        with torch.no_grad():
            return float(label_losses(trainer.model(task.train_x), task.train_y).mean())

    before = training_loss()
    trainer.train(20)
    assert training_loss() < before - 0.5


@pytest.mark.skipif(not SHARED_FILE.is_file(), reason=f"the real tiny-shakespeare file is not at {SHARED_FILE}")
def test_the_real_file_has_65_characters_many_speakers_and_splits_for_8_peers() -> None:
    task = load_task("shakespeare", SHARED_FILE.parents[1], peers=8)
    assert task.num_classes == 65
    characters = collections.Counter()
    for speaker, start, end in speaker_turns(SHARED_FILE.read_text(encoding="utf-8")):
        characters[speaker] += end - start
    assert sum(count >= 5000 for count in characters.values()) >= 64
    assert all(count > 0 for count in torch.bincount(task.owners, minlength=8).tolist())


def test_the_download_setting_allows_a_download_for_one_load_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    payload = TEXT.encode()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    monkeypatch.setattr(shakespeare, "SHA256", hashlib.sha256(payload).hexdigest())
    with pytest.raises(TaskError, match="give --download"):
        load_task("shakespeare", tmp_path / "elsewhere")
    assert load_task("shakespeare", tmp_path / "data", download=True).train_x.shape == (30, 64)
    assert (tmp_path / "data" / "tinyshakespeare" / "input.txt").read_bytes() == payload
    with pytest.raises(TaskError, match="give --download"):  # the next load, without it, may not
        load_task("shakespeare", tmp_path / "elsewhere")
