"""Tiny-shakespeare, next-character prediction split by speaker, and the character GPT that learns it.

The held-out test text is the file's last tenth, as in nanoGPT's character recipe, so its loss
compares with nanoGPT's. The first nine tenths are parsed into speaker turns; each speaker's
turns, in order, make that speaker's stream, and the training samples are windows cut from the
streams. Every window belongs to one speaker, which iid, Dirichlet and shard partitions split
by, and the natural partition gives whole speakers to peers, as LEAF's Shakespeare benchmark does.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from peer.tasks.base import Task, TaskError, cache_dir, downloads_allowed, fetch_checked
from peer.tasks.gpt import make_char_gpt

FOLDER_NAME = "tinyshakespeare"
FILE_NAME = "input.txt"
DOWNLOAD_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # a download is kept only when it matches
CONTEXT = 64  # characters the model sees; each window holds CONTEXT + 1, its inputs and, one later, its targets
TRAIN_STRIDE = 32  # training windows overlap by half
TEST_FRACTION = 0.1  # the last tenth of the text is held out, as nanoGPT's character recipe holds it out
# Enough for a held-out tenth of at least one window.
MIN_CHARACTERS = round((CONTEXT + 1) / TEST_FRACTION)
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.1
_FIX = (
    f"pass --data-dir pointing at the folder that contains {FOLDER_NAME}/{FILE_NAME} (e.g. ~/data), "
    "or give --download (or set PEER_DOWNLOAD=1) to download it"
)
_REPLACE = f"replace it with tiny-shakespeare's {FILE_NAME}, or delete it and set PEER_DOWNLOAD=1"

# Reading, parsing and cutting the full file takes about 0.05 s on 2 cores (0.4 s at most on a busy
# machine), so the windows are not cached.


def load_shakespeare(data_dir: Path | None, peers: int | None = None) -> Task:
    """The shakespeare task from data_dir/tinyshakespeare/input.txt or data_dir/input.txt.

    Without data_dir the file is looked for, and downloaded when PEER_DOWNLOAD=1, in the cache
    dir. With peers, the task's natural split gives each peer whole speakers (see natural_owners).
    """
    if peers is not None and (isinstance(peers, bool) or not isinstance(peers, int) or peers < 1):
        raise TaskError(f"task 'shakespeare' needs a whole number of peers >= 1, got {peers!r}")
    path = _find_or_download(data_dir)
    text = _read_text(path)
    if len(text) < MIN_CHARACTERS:
        raise TaskError(
            f"{path} holds {len(text)} characters, too few: the shakespeare task needs at least {MIN_CHARACTERS}; {_REPLACE}"
        )
    vocabulary, codes = encode(text)
    if len(vocabulary) < 2:
        raise TaskError(f"{path} holds only one distinct character, so there is nothing to predict; {_REPLACE}")
    cut = int(len(text) * (1 - TEST_FRACTION))
    names, streams = speaker_streams(text[:cut], codes[:cut])
    windows = [_windows(stream, TRAIN_STRIDE) for stream in streams]
    # A speaker with fewer than CONTEXT + 1 characters of training text gives no window: leave them out.
    kept = [s for s, w in enumerate(windows) if len(w)]
    if not kept:
        raise TaskError(
            f"{path} has no speaker with {CONTEXT + 1} characters of turns in its first {cut} characters "
            f"(a turn starts with a line NAME: after a blank line); {_REPLACE}"
        )
    names, windows = [names[s] for s in kept], [windows[s] for s in kept]
    train = np.concatenate(windows)
    sizes = [len(w) for w in windows]
    groups = np.repeat(np.arange(len(names)), sizes)
    # With more peers than speakers there is no natural split (the other partitions still work).
    owners = None
    if peers is not None and peers <= len(names):
        owners = torch.from_numpy(natural_owners(sizes, names, peers)[groups])
    # The held-out text in windows whose targets tile it: window i's inputs are characters
    # 64i .. 64i+63 of it and its targets one later, so each character after the first is predicted once.
    test = _windows(codes[cut:], CONTEXT)
    return Task(
        name="shakespeare",
        train_x=torch.from_numpy(train[:, :-1].copy()),
        train_y=torch.from_numpy(train[:, 1:].copy()),
        test_x=torch.from_numpy(test[:, :-1].copy()),
        test_y=torch.from_numpy(test[:, 1:].copy()),
        num_classes=len(vocabulary),
        make_model=functools.partial(make_char_gpt, len(vocabulary), CONTEXT),
        learning_rate=LEARNING_RATE,
        optimizer="adamw",
        weight_decay=WEIGHT_DECAY,
        owners=owners,
        groups=torch.from_numpy(groups),
    )


def encode(text: str) -> tuple[str, np.ndarray]:
    """The vocabulary (the text's distinct characters, sorted) and each character's index in it, as int64."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    vocabulary = np.unique(points)
    return "".join(map(chr, vocabulary.tolist())), np.searchsorted(vocabulary, points).astype(np.int64)


def speaker_turns(text: str) -> list[tuple[str, int, int]]:
    """Each speaker turn of text as (speaker, start, end): text[start:end] is the turn.

    A turn begins with a header line NAME: (a line ending with ':' that follows a blank line or
    starts the text) and runs through the lines after it and the blank lines that end it, up to
    the next paragraph, so its text holds the speaker's name and the newlines. A paragraph that
    does not begin with a header is text outside any turn; it has no speaker to belong to, so it
    is left out of training (tiny-shakespeare has none: every paragraph is a turn).
    """
    turns: list[tuple[str, int, int]] = []
    speaker: str | None = None  # the speaker of the paragraph being read; None outside a turn
    start = position = 0
    after_blank = True
    for line in text.split("\n"):
        blank = not line.strip()
        if after_blank and not blank:  # a paragraph begins: the one before it ends here
            if speaker is not None:
                turns.append((speaker, start, position))
            header = line.rstrip()
            speaker = header[:-1] if header.endswith(":") and len(header) > 1 else None
            start = position
        after_blank = blank
        position += len(line) + 1
    if speaker is not None:
        turns.append((speaker, start, len(text)))
    return turns


def speaker_streams(text: str, codes: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """The speakers of text in order of their first turn, and each one's turns' codes, concatenated in order."""
    pieces: dict[str, list[np.ndarray]] = {}
    for speaker, start, end in speaker_turns(text):
        pieces.setdefault(speaker, []).append(codes[start:end])
    return list(pieces), [np.concatenate(parts) for parts in pieces.values()]


def natural_owners(sizes: list[int], names: list[str], peers: int) -> np.ndarray:
    """The peer of each speaker: by number of windows, largest first (ties by name), each speaker
    goes to the peer with the fewest windows so far (ties to the lowest index)."""
    loads = np.zeros(peers, dtype=np.int64)
    owners = np.empty(len(sizes), dtype=np.int64)
    for speaker in sorted(range(len(sizes)), key=lambda s: (-sizes[s], names[s])):
        peer = int(np.argmin(loads))  # the first of the least loaded
        owners[speaker] = peer
        loads[peer] += sizes[speaker]
    return owners


def _windows(codes: np.ndarray, stride: int) -> np.ndarray:
    """Windows of CONTEXT + 1 codes starting every stride codes; a tail too short for a window is left out."""
    if len(codes) < CONTEXT + 1:
        return np.empty((0, CONTEXT + 1), dtype=np.int64)
    return np.lib.stride_tricks.sliding_window_view(codes, CONTEXT + 1)[::stride]


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as err:
        raise TaskError(f"cannot read {path} ({err.strerror or err}): check its permissions, or {_REPLACE}") from err
    except UnicodeDecodeError as err:
        raise TaskError(f"{path} is not UTF-8 text (byte {err.start} is not): {_REPLACE}") from err


def _find_or_download(data_dir: Path | None) -> Path:
    candidates = [cache_dir() / FOLDER_NAME] if data_dir is None else [data_dir / FOLDER_NAME, data_dir]
    for folder in candidates:
        if (folder / FILE_NAME).is_file():
            return folder / FILE_NAME
    target = _download_target(data_dir) / FILE_NAME
    if downloads_allowed():
        _download(target)
        return target
    if data_dir is None:
        raise TaskError(f"shakespeare needs {FOLDER_NAME}/{FILE_NAME}, not found in {cache_dir()}: {_FIX}")
    if not data_dir.is_dir():
        raise TaskError(f"data directory {data_dir} does not exist: {_FIX}")
    raise TaskError(f"tiny-shakespeare file {target} is missing: {_FIX}")


def _download_target(data_dir: Path | None) -> Path:
    if data_dir is None:
        return cache_dir() / FOLDER_NAME
    # A data_dir that already names the dataset's folder is where the file belongs.
    return data_dir if data_dir.name == FOLDER_NAME else data_dir / FOLDER_NAME


def _download(target: Path) -> None:
    fetch_checked(DOWNLOAD_URL, target, "sha256", SHA256, f"put the file at {target}")
