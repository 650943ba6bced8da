"""Tests for splitting samples across peers."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.tasks import PartitionError, partition

NUM_CLASSES = 10


def balanced_labels(per_class: int = 100, seed: int = 0) -> np.ndarray:
    """Shuffled labels with per_class samples of each class."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(NUM_CLASSES), per_class))


def assert_disjoint_cover(parts: list[np.ndarray], n_samples: int, n_peers: int) -> None:
    assert len(parts) == n_peers
    assert all(len(part) > 0 for part in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)), "a sample was given to two peers"
    assert np.array_equal(np.sort(joined), np.arange(n_samples)), "some samples were left out"


def mean_classes_per_peer(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([len(np.unique(labels[part])) for part in parts]))


@settings(max_examples=30, deadline=None)
@given(n_peers=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_iid_is_disjoint_cover_of_even_sizes(n_peers: int, seed: int) -> None:
    labels = balanced_labels()
    parts = partition(labels, n_peers, "iid", seed)
    assert_disjoint_cover(parts, len(labels), n_peers)
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=30, deadline=None)
@given(n_peers=st.integers(1, 20), seed=st.integers(0, 2**32 - 1), alpha=st.sampled_from(["0.3", "1", "100"]))
def test_dirichlet_is_disjoint_cover(n_peers: int, seed: int, alpha: str) -> None:
    labels = balanced_labels()
    parts = partition(labels, n_peers, f"dirichlet:{alpha}", seed)
    assert_disjoint_cover(parts, len(labels), n_peers)
    assert min(len(part) for part in parts) >= 10


@settings(max_examples=30, deadline=None)
@given(n_peers=st.integers(1, 40), shards_per_peer=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_shards_are_disjoint_cover(n_peers: int, shards_per_peer: int, seed: int) -> None:
    labels = balanced_labels()
    parts = partition(labels, n_peers, f"shards:{shards_per_peer}", seed)
    assert_disjoint_cover(parts, len(labels), n_peers)


def test_accepts_torch_labels() -> None:
    labels = balanced_labels()
    from_tensor = partition(torch.from_numpy(labels), 4, "dirichlet:0.5", seed=3)
    from_array = partition(labels, 4, "dirichlet:0.5", seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(from_tensor, from_array))


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "shards:2"])
def test_same_seed_same_split_and_other_seed_differs(spec: str) -> None:
    labels = balanced_labels()
    first = partition(labels, 5, spec, seed=7)
    again = partition(labels, 5, spec, seed=7)
    other = partition(labels, 5, spec, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_small_alpha_is_more_label_skewed_than_large_alpha() -> None:
    labels = balanced_labels(per_class=400)
    skewed = np.mean([mean_classes_per_peer(labels, partition(labels, 8, "dirichlet:0.05", s)) for s in range(5)])
    uniform = np.mean([mean_classes_per_peer(labels, partition(labels, 8, "dirichlet:100", s)) for s in range(5)])
    assert uniform == NUM_CLASSES
    assert skewed < 5


def test_aligned_shards_give_each_peer_at_most_k_classes() -> None:
    # 10 classes x 100 samples into 5 peers x 2 shards: every shard is exactly one class.
    labels = balanced_labels(per_class=100)
    for seed in range(10):
        parts = partition(labels, 5, "shards:2", seed)
        assert all(len(np.unique(labels[part])) <= 2 for part in parts)


def test_unaligned_shards_span_few_classes() -> None:
    # A shard no longer than the smallest class straddles at most two classes.
    labels = balanced_labels(per_class=400)
    parts = partition(labels, 8, "shards:2", seed=0)
    assert all(len(np.unique(labels[part])) <= 4 for part in parts)


@pytest.mark.parametrize(
    ("spec", "n_peers", "message"),
    [
        ("random", 4, "use one of iid, dirichlet:ALPHA, shards:K"),
        ("iid:2", 4, "use one of"),
        ("dirichlet", 4, "dirichlet alpha must be > 0"),
        ("dirichlet:0", 4, "dirichlet alpha must be > 0"),
        ("dirichlet:-1", 4, "dirichlet alpha must be > 0"),
        ("dirichlet:abc", 4, "dirichlet alpha must be > 0"),
        ("dirichlet:nan", 4, "dirichlet alpha must be > 0"),
        ("shards:0", 4, "shards K must be an integer >= 1"),
        ("shards:1.5", 4, "shards K must be an integer >= 1"),
        ("shards:x", 4, "shards K must be an integer >= 1"),
        ("shards:200", 10, "lower K or use fewer peers"),
        ("iid", 0, "n_peers must be an integer >= 1"),
        ("iid", 1001, "use fewer peers"),
    ],
)
def test_bad_requests_raise_partition_error(spec: str, n_peers: int, message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        partition(balanced_labels(), n_peers, spec, seed=0)


def test_impossible_dirichlet_says_raise_alpha_or_use_fewer_peers() -> None:
    # 100 peers need 10 of the 1000 samples each, but alpha 0.001 puts each class on about one peer.
    with pytest.raises(PartitionError, match="raise alpha or use fewer peers"):
        partition(balanced_labels(), 100, "dirichlet:0.001", seed=0)
