"""A real peer's checkpoint: everything it needs to go on after a crash, in one safetensors file.

The file holds the model (``model.*``), what training goes on from besides it (``training.*``:
momentum, the batch order, the schedule's position) and the protocol's own state
(``protocol.*``), with the round to go on from, the length of ``metrics.jsonl`` that belongs to
the rounds before it, and what the model was made for (task, protocol family, model layout) in
the header's metadata. Writing goes through a temporary file that is synced and then renamed,
so a failed write (a full disk, a crash) leaves the previous checkpoint as it was. Reading
checks everything before handing anything over: a file from another task or model, from
another program, or cut short is refused with the reason, never half-loaded; so is one whose
model, round or length of ``metrics.jsonl`` no run of this program could have written, before the
log is cut back or the peer joins its swarm.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from gossip.learner import State, is_finite
from gossip.robust import OUTLIER_SIZE, distance, model_scale
from peer.errors import ConfigError
from peer.metrics import START_AFRESH, kept_records

log = logging.getLogger(__name__)

FILE = "checkpoint.safetensors"
FORMAT = "gossip-peer-checkpoint/1"
SECTIONS = ("model", "training", "protocol")
class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from; the message says why and what to do."""


@dataclass
class Checkpoint:
    round: int  # the first round still to run
    model: State
    training: dict[str, torch.Tensor] = field(default_factory=dict)
    protocol: dict[str, torch.Tensor] = field(default_factory=dict)
    protocol_meta: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""  # task, protocol family and model layout (peer.net.node.fingerprint)
    task: str = ""
    algorithm: str = ""
    metrics_bytes: int = 0  # the part of metrics.jsonl written before ``round``


def write_checkpoint(folder: Path, checkpoint: Checkpoint) -> bool:
    """Write atomically to ``folder``; False (and the previous checkpoint kept) when the model is
    not finite or the write fails."""
    if not is_finite(checkpoint.model):
        log.error("the model is NaN or infinite; not writing a checkpoint (the previous one is kept)")
        return False
    tensors = {
        f"{section}.{name}": tensor.detach().contiguous().cpu()
        for section, part in (("model", checkpoint.model), ("training", checkpoint.training), ("protocol", checkpoint.protocol))
        for name, tensor in part.items()
    }
    metadata = {
        "format": FORMAT,
        "round": str(checkpoint.round),
        "fingerprint": checkpoint.fingerprint,
        "task": checkpoint.task,
        "algorithm": checkpoint.algorithm,
        "metrics_bytes": str(checkpoint.metrics_bytes),
        "protocol": json.dumps(checkpoint.protocol_meta),
    }
    path = folder / FILE
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        data = save(tensors, metadata=metadata)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        _sync_folder(folder)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        log.error("could not write a checkpoint to %s (%s); the previous one is kept", path, error.strerror or error)
        return False
    return True


def _sync_folder(folder: Path) -> None:
    """The rename itself reaches the disk (a power cut after it must not bring the old file back)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(folder: Path) -> Checkpoint:
    """The checkpoint in ``folder``; CheckpointError when there is none or it cannot be used."""
    path = folder / FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"--resume: there is no checkpoint in {folder}; run without --resume to start afresh") from None
    except OSError as error:
        raise CheckpointError(f"--resume: cannot read {path} ({error.strerror or error})") from None
    try:
        tensors = load(data)
        metadata = _metadata(data)
    except (SafetensorError, ValueError) as error:
        raise CheckpointError(
            f"--resume: {path} is damaged or cut short ({str(error)[:200]}); remove it to start afresh"
        ) from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"--resume: {path} is not a checkpoint this program can resume from (format {metadata.get('format')!r}, "
            f"expected {FORMAT!r}); remove it to start afresh"
        )
    try:
        checkpoint = Checkpoint(
            round=int(metadata["round"]),
            model={},
            fingerprint=metadata["fingerprint"],
            task=metadata["task"],
            algorithm=metadata["algorithm"],
            metrics_bytes=int(metadata["metrics_bytes"]),
            protocol_meta=json.loads(metadata["protocol"]),
        )
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"--resume: {path} has a damaged header ({error!r}); remove it to start afresh") from None
    if checkpoint.round < 0 or checkpoint.metrics_bytes < 0 or not isinstance(checkpoint.protocol_meta, dict):
        raise CheckpointError(f"--resume: {path} has a damaged header; remove it to start afresh")
    parts = {section: {} for section in SECTIONS}
    for name, tensor in tensors.items():
        section, _, rest = name.partition(".")
        if section not in parts or not rest:
            raise CheckpointError(f"--resume: {path} holds an unknown tensor {name[:100]!r}; remove it to start afresh")
        parts[section][rest] = tensor
    checkpoint.model, checkpoint.training, checkpoint.protocol = parts["model"], parts["training"], parts["protocol"]
    return checkpoint


def _metadata(data: bytes) -> dict[str, str]:
    """The header's metadata (``load`` has checked the header already)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__") or {}


def check_fits(checkpoint: Checkpoint, *, fingerprint: str, task: str, algorithm: str, model: State) -> None:
    """CheckpointError unless the checkpoint was written by a peer of this task, protocol and model,
    and its model is one training could have reached: finite, and no farther from ``model`` (a fresh
    one) than the outlier guard lets a neighbour's be, so that a forged or corrupted model is not
    trained on and handed to the swarm."""
    if checkpoint.task != task:
        raise CheckpointError(
            f"--resume: the checkpoint was written for task {checkpoint.task!r}, and this peer trains {task!r}; "
            "give the same --task, or another --out"
        )
    written_by = checkpoint.algorithm
    if written_by != algorithm:
        raise CheckpointError(
            f"--resume: the checkpoint was written by a {written_by!r} peer, and this one runs {algorithm!r}; "
            "give the same --algorithm, or another --out"
        )
    layout = {name: (tuple(t.shape), t.dtype) for name, t in model.items()}
    saved = {name: (tuple(t.shape), t.dtype) for name, t in checkpoint.model.items()}
    if saved != layout:
        different = sorted(set(layout) ^ set(saved) | {n for n in set(layout) & set(saved) if layout[n] != saved[n]})
        raise CheckpointError(
            f"--resume: the checkpoint's model does not match this peer's (differs at {', '.join(different[:5])}); "
            "give the same --task and model settings, or another --out"
        )
    if checkpoint.fingerprint != fingerprint:
        raise CheckpointError(
            "--resume: the checkpoint was written by a peer that exchanges models another way (codec family or "
            "error feedback differ); give the same settings, or another --out"
        )
    if not is_finite(checkpoint.model):
        raise CheckpointError("--resume: the checkpoint's model is NaN or infinite; remove it to start afresh")
    far, bound = distance(model, checkpoint.model), OUTLIER_SIZE * model_scale(model)
    if far > bound:
        raise CheckpointError(
            f"--resume: the checkpoint's model is {far:.3g} away from a fresh one, beyond the {bound:.3g} the outlier "
            "guard allows a model of this size; remove it to start afresh"
        )


def check_progress(checkpoint: Checkpoint, log: Path, rounds: int, *, ordered: bool = True) -> None:
    """CheckpointError, with nothing changed on disk, unless the checkpoint's round is within the run's
    ``rounds`` and its ``metrics_bytes`` is where its rounds end in the log at ``log``.

    A peer takes that length right after writing a record, and goes on from a round past the
    record's, so the last record kept is of a round below the checkpoint's. Where records come in
    round order, the next one was written after the checkpoint, so it is of the checkpoint's round
    or later: a length cut short, which would drop rounds the checkpoint includes, is refused."""
    if checkpoint.round > rounds:
        raise CheckpointError(
            f"--resume: the checkpoint goes on from round {checkpoint.round}, and this run has {rounds} rounds; "
            "give the --rounds it was written with, or remove it to start afresh"
        )
    try:
        kept, following = kept_records(log, checkpoint.metrics_bytes)
    except ConfigError as error:
        raise CheckpointError(str(error)) from None
    if kept and kept[-1].round >= checkpoint.round:
        raise CheckpointError(
            f"--resume: the checkpoint goes on from round {checkpoint.round}, yet keeps line {len(kept)} of {log}, "
            f"of round {kept[-1].round}; {START_AFRESH}"
        )
    if following and following.round < checkpoint.round and ordered:
        raise CheckpointError(
            f"--resume: the checkpoint goes on from round {checkpoint.round}, yet would drop line {len(kept) + 1} "
            f"of {log}, of round {following.round}; {START_AFRESH}"
        )


def read_model(path: Path) -> State:
    """The model of a checkpoint file (for comparing the peers of a finished run)."""
    with open(path, "rb") as f:
        tensors = load(f.read())
    return {name.removeprefix("model."): t for name, t in tensors.items() if name.startswith("model.")}
