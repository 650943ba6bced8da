"""Splitting a dataset's samples across peers: IID, Dirichlet label skew, label shards, or the task's own split."""

from __future__ import annotations

import math

import numpy as np
import torch

PARTITION_SPECS = ("iid", "dirichlet:ALPHA", "shards:K", "natural")
# Dirichlet draws are repeated until each peer holds this many samples (fewer when the data is small).
DIRICHLET_MIN_SAMPLES = 10
DIRICHLET_MAX_DRAWS = 1000


class PartitionError(ValueError):
    """A partition spec is invalid or cannot be met; the message says what to change."""


def partition(
    labels: np.ndarray | torch.Tensor,
    n_peers: int,
    spec: str,
    seed: int,
    owners: np.ndarray | torch.Tensor | None = None,
) -> list[np.ndarray]:
    """Disjoint, non-empty index arrays into labels, one per peer, the same for the same seed.

    owners: the peer each sample was generated for (a task's own split), which `natural` follows."""
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if labels.ndim != 1:
        raise PartitionError(f"labels must be 1-D, got shape {labels.shape}")
    if not isinstance(n_peers, (int, np.integer)) or n_peers < 1:
        raise PartitionError(f"n_peers must be an integer >= 1, got {n_peers!r}")
    if n_peers > len(labels):
        raise PartitionError(f"cannot give {n_peers} peers a sample each from {len(labels)} samples: use fewer peers")
    kind, _, arg = spec.partition(":")
    rng = np.random.default_rng(seed)
    if spec == "iid":
        parts = np.array_split(rng.permutation(len(labels)), n_peers)
    elif kind == "dirichlet":
        parts = _dirichlet(labels, n_peers, _parse_alpha(arg), rng)
    elif kind == "shards":
        parts = _shards(labels, n_peers, _parse_shard_count(arg), rng)
    elif spec == "natural":
        parts = _natural(len(labels), n_peers, owners)
    else:
        choices = ", ".join(PARTITION_SPECS)
        raise PartitionError(f"unknown partition {spec!r}: use one of {choices} (e.g. dirichlet:0.5, shards:2)")
    return [np.sort(part).astype(np.int64) for part in parts]


def _parse_alpha(text: str) -> float:
    try:
        alpha = float(text)
    except ValueError:
        alpha = math.nan
    if not (0 < alpha < math.inf):
        raise PartitionError(f"dirichlet alpha must be > 0, got {text!r} (e.g. dirichlet:0.5)")
    return alpha


def _parse_shard_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise PartitionError(f"shards K must be an integer >= 1, got {text!r} (e.g. shards:2)")
    return count


def _dirichlet(labels: np.ndarray, n_peers: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, give each peer a share drawn from Dir(alpha): small alpha means few classes per peer."""
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    min_samples = min(DIRICHLET_MIN_SAMPLES, len(labels) // n_peers)
    for _ in range(DIRICHLET_MAX_DRAWS):
        # Cut points per class; only sizes are checked before any indices are gathered.
        cuts = [
            (np.cumsum(rng.dirichlet(np.full(n_peers, alpha)))[:-1] * len(members)).astype(int)
            for members in by_class
        ]
        sizes = sum(np.diff(np.concatenate(([0], cut, [len(members)]))) for cut, members in zip(cuts, by_class))
        if sizes.min() >= min_samples:
            pieces = [np.split(members, cut) for cut, members in zip(cuts, by_class)]
            return [np.concatenate([class_pieces[peer] for class_pieces in pieces]) for peer in range(n_peers)]
    raise PartitionError(
        f"dirichlet:{alpha:g} left some of {n_peers} peers with fewer than {min_samples} samples "
        f"in {DIRICHLET_MAX_DRAWS} draws: raise alpha or use fewer peers"
    )


def _shards(labels: np.ndarray, n_peers: int, per_peer: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Sort by label, cut into n_peers * per_peer contiguous shards, deal per_peer random shards to each peer."""
    n_shards = n_peers * per_peer
    if n_shards > len(labels):
        raise PartitionError(
            f"shards:{per_peer} needs {n_shards} samples for {n_peers} peers but there are {len(labels)}: "
            "lower K or use fewer peers"
        )
    # Shuffle before the stable sort so each shard's samples are a random draw from its class.
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, n_shards)
    owners = rng.permutation(n_shards).reshape(n_peers, per_peer)
    return [np.concatenate([shards[s] for s in peer_shards]) for peer_shards in owners]


def _natural(n_samples: int, n_peers: int, owners: np.ndarray | torch.Tensor | None) -> list[np.ndarray]:
    """Sample s to peer owners[s]: the split the task generated its data with."""
    if owners is None:
        raise PartitionError(
            f"the task has no natural split for {n_peers} peers (some tasks have none; one by speaker has at most "
            "one peer per speaker): use fewer peers, or iid, dirichlet:ALPHA or shards:K"
        )
    owners = owners.cpu().numpy() if isinstance(owners, torch.Tensor) else np.asarray(owners)
    if owners.shape != (n_samples,) or not np.issubdtype(owners.dtype, np.integer):
        raise PartitionError(
            f"the task's natural split must name an integer peer for each of {n_samples} samples, "
            f"got {owners.dtype} of shape {owners.shape}"
        )
    peers = np.unique(owners)
    if not np.array_equal(peers, np.arange(n_peers)):
        raise PartitionError(
            f"the task's natural split has peers {peers.min()}..{peers.max()} ({len(peers)} distinct), "
            f"not 0..{n_peers - 1}: load the task for {n_peers} peers, or use iid, dirichlet:ALPHA or shards:K"
        )
    order = np.argsort(owners, kind="stable")
    return np.split(order, np.cumsum(np.bincount(owners, minlength=n_peers))[:-1])
