"""Tests for the synthetic logistic task: its data, its natural split and its exact optimum."""

import dataclasses

import numpy as np
import pytest
import torch

from peer.tasks import PartitionError, Task, TaskError, load_task, logistic, partition

PEERS = 8
TRAIN_SAMPLES = PEERS * logistic.SAMPLES_PER_PEER


@pytest.fixture(scope="module")
def task() -> Task:
    return load_task("logistic", None, peers=PEERS)


def shards_of(task: Task, parts: list[np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(task.train_x[part], task.train_y[part]) for part in parts]


def model_at(task: Task, parameters: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = task.make_model().double()
    model.load_state_dict(parameters)
    return model


def regularised_loss(model: torch.nn.Module, shards: list, weight_decay: float) -> torch.Tensor:
    """Mean over shards of each shard's mean cross-entropy, plus weight_decay / 2 ||all parameters||^2."""
    losses = [torch.nn.functional.cross_entropy(model(x.double()), y) for x, y in shards]
    penalty = sum(parameter.square().sum() for parameter in model.parameters())
    return torch.stack(losses).mean() + weight_decay / 2 * penalty


def gradient_norm(model: torch.nn.Module, shards: list, weight_decay: float) -> float:
    model.zero_grad()
    regularised_loss(model, shards, weight_decay).backward()
    return float(torch.cat([parameter.grad.flatten() for parameter in model.parameters()]).norm())


def assert_is_minimum(task: Task, shards: list, optimum: dict[str, torch.Tensor]) -> None:
    model = model_at(task, optimum)
    assert gradient_norm(model, shards, task.weight_decay) < 1e-10
    with torch.no_grad():
        best = float(regularised_loss(model, shards, task.weight_decay))
        generator = torch.Generator().manual_seed(0)
        for scale in (1e-3, 1e-1):
            for _ in range(5):
                for name, parameter in model.named_parameters():
                    noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
                    parameter.copy_(optimum[name] + scale * noise)
                assert float(regularised_loss(model, shards, task.weight_decay)) > best


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[name] - b[name]).square().sum() for name in a) ** 0.5)


def test_same_peers_give_the_same_data_and_more_peers_keep_it(task: Task) -> None:
    again = load_task("logistic", None, peers=PEERS)
    larger = load_task("logistic", None, peers=PEERS + 3)
    for field in ("train_x", "train_y", "test_x", "test_y", "owners"):
        assert torch.equal(getattr(task, field), getattr(again, field))
    kept = larger.owners < PEERS
    assert torch.equal(larger.train_x[kept], task.train_x) and torch.equal(larger.train_y[kept], task.train_y)


def test_shapes_dtypes_and_defaults(task: Task) -> None:
    per_peer, test_per_peer = logistic.SAMPLES_PER_PEER, logistic.TEST_SAMPLES_PER_PEER
    assert task.name == "logistic" and task.num_classes == 2
    assert task.train_x.shape == (PEERS * per_peer, logistic.FEATURES) and task.train_x.dtype == torch.float32
    assert task.test_x.shape == (PEERS * test_per_peer, logistic.FEATURES) and task.test_x.dtype == torch.float32
    assert task.train_y.dtype == torch.int64 and set(task.train_y.tolist()) == {0, 1}
    assert task.learning_rate == logistic.LEARNING_RATE and task.weight_decay == logistic.WEIGHT_DECAY > 0
    assert all(int(torch.count_nonzero(parameter)) == 0 for parameter in task.make_model().parameters())
    task.validate()


def test_owners_cover_every_peer_equally(task: Task) -> None:
    assert task.owners.dtype == torch.int64
    assert torch.bincount(task.owners).tolist() == [logistic.SAMPLES_PER_PEER] * PEERS


def test_peers_local_optima_differ_more_than_in_a_shuffled_split(task: Task) -> None:
    def mean_squared_distance_of_local_optima(parts: list[np.ndarray]) -> float:
        shards = shards_of(task, parts)
        overall = task.optimum(shards, task.weight_decay)
        return float(np.mean([distance(task.optimum([shard], task.weight_decay), overall) ** 2 for shard in shards]))

    spread = mean_squared_distance_of_local_optima
    natural = spread(partition(task.train_y, PEERS, "natural", 0, owners=task.owners))
    # Shuffled, the same samples differ between peers by sampling noise alone.
    shuffled = np.mean([spread(partition(task.train_y, PEERS, "iid", seed)) for seed in range(3)])
    assert natural > 1.5 * shuffled


def test_natural_partition_gives_each_peer_its_part(task: Task) -> None:
    parts = partition(task.train_y, PEERS, "natural", seed=0, owners=task.owners)
    for peer, part in enumerate(parts):
        assert part.tolist() == torch.nonzero(task.owners == peer).flatten().tolist()
    from_numpy = partition(task.train_y, PEERS, "natural", seed=1, owners=task.owners.numpy())
    assert all(np.array_equal(a, b) for a, b in zip(from_numpy, parts))


@pytest.mark.parametrize(
    ("n_peers", "owners", "message"),
    [
        (4, None, r"the task has no natural split for 4 peers \(.*\): use fewer peers, or iid, dirichlet:ALPHA or shards:K"),
        (4, np.repeat(np.arange(5), 4), r"peers 0..4 \(5 distinct\), not 0..3: load the task for 4 peers"),
        (4, np.repeat([0, 1, 2, 4], 5), r"not 0..3"),
        (4, np.repeat(np.arange(4), 4), "must name an integer peer for each of 20 samples"),
        (4, np.repeat(np.arange(4.0), 5), "must name an integer peer"),
    ],
)
def test_natural_partition_errors(n_peers: int, owners: np.ndarray | None, message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        partition(np.arange(20) % 2, n_peers, "natural", seed=0, owners=owners)


def test_logistic_needs_the_number_of_peers() -> None:
    with pytest.raises(TaskError, match="task 'logistic' generates one part per peer: load it with the number"):
        load_task("logistic", None)


@pytest.mark.parametrize("peers", [0, -3, 2.5, True])
def test_logistic_refuses_a_bad_number_of_peers(peers: object) -> None:
    with pytest.raises(TaskError, match="needs a whole number of peers >= 1"):
        load_task("logistic", None, peers=peers)


def test_optimum_of_the_equal_split_is_a_minimum_and_the_pooled_one(task: Task) -> None:
    shards = shards_of(task, partition(task.train_y, PEERS, "natural", seed=0, owners=task.owners))
    optimum = task.optimum(shards, task.weight_decay)
    assert {name: value.dtype for name, value in optimum.items()} == {"weight": torch.float64, "bias": torch.float64}
    assert {name: value.shape for name, value in optimum.items()} == {
        name: value.shape for name, value in task.make_model().state_dict().items()
    }
    assert_is_minimum(task, shards, optimum)
    pooled = task.optimum([(task.train_x, task.train_y)], task.weight_decay)
    assert distance(optimum, pooled) < 1e-9


def test_optimum_of_an_unequal_split_weighs_peers_not_samples(task: Task) -> None:
    parts = partition(task.train_y, PEERS, "dirichlet:0.3", seed=2)
    assert max(map(len, parts)) > 2 * min(map(len, parts))
    shards = shards_of(task, parts)
    optimum = task.optimum(shards, task.weight_decay)
    assert_is_minimum(task, shards, optimum)
    pooled = task.optimum([(task.train_x, task.train_y)], task.weight_decay)
    assert distance(optimum, pooled) > 1e-3


def test_sgd_with_the_tasks_step_and_weight_decay_converges_to_the_optimum(task: Task) -> None:
    shards = shards_of(task, partition(task.train_y, PEERS, "natural", seed=0, owners=task.owners))
    model = task.make_model().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=task.learning_rate, weight_decay=task.weight_decay)
    for _ in range(150):
        optimizer.zero_grad()
        # The penalty comes from the optimizer's weight_decay, so the loss here is the data term alone.
        regularised_loss(model, shards, 0.0).backward()
        optimizer.step()
    assert distance(model.state_dict(), task.optimum(shards, task.weight_decay)) < 1e-8


def test_the_optimum_classifies_the_test_set_well_above_chance() -> None:
    task = load_task("logistic", None, peers=32)
    shards = shards_of(task, partition(task.train_y, 32, "natural", seed=0, owners=task.owners))
    model = task.make_model()
    model.load_state_dict({name: value.float() for name, value in task.optimum(shards, task.weight_decay).items()})
    with torch.no_grad():
        accuracy = float((model(task.test_x).argmax(1) == task.test_y).double().mean())
    majority = float(torch.bincount(task.test_y).max()) / len(task.test_y)
    assert accuracy > majority + 0.15


@pytest.mark.parametrize(
    ("shards", "weight_decay", "message"),
    [
        ([], 0.5, "needs at least one shard"),
        ([(torch.zeros(3, 2), torch.tensor([0, 1, 0]))], 0.0, "unique only with weight_decay > 0"),
        ([(torch.zeros(3, 2), torch.tensor([0, 1]))], 0.5, r"shard 0: needs samples x of shape \(n, 2\)"),
        ([(torch.zeros(2, 2), torch.tensor([0, 1])), (torch.zeros(2, 3), torch.tensor([0, 1]))], 0.5, "shard 1"),
        ([(torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64))], 0.5, "n >= 1"),
        ([(torch.zeros(2, 2), torch.tensor([0, 2]))], 0.5, r"labels must be 0 or 1, got \[0, 2\]"),
        ([(torch.zeros(2, 2), torch.tensor([0.0, 1.0]))], 0.5, "labels must be int64"),
        ([(torch.tensor([[0.0, float("nan")]]), torch.tensor([1]))], 0.5, "NaN or infinite"),
    ],
)
def test_optimum_refuses_bad_shards(shards: list, weight_decay: float, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        logistic.regularised_optimum(shards, weight_decay)


def test_optimum_says_when_newton_does_not_converge(task: Task, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logistic, "NEWTON_MAX_STEPS", 1)
    with pytest.raises(TaskError, match=r"the optimum was not found: gradient norm .* after 1 Newton steps"):
        task.optimum([(task.train_x, task.train_y)], task.weight_decay)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"owners": torch.zeros(5, dtype=torch.int64)}, rf"one peer per training sample, shape \({TRAIN_SAMPLES},\)"),
        ({"owners": torch.zeros(TRAIN_SAMPLES, dtype=torch.int32)}, "owners must be an int64 torch.Tensor"),
        ({"owners": torch.arange(TRAIN_SAMPLES) - 1}, "owners must be peer indices >= 0, got -1"),
        ({"owners": torch.arange(TRAIN_SAMPLES) * PEERS // TRAIN_SAMPLES * 2}, "0 to 14, but peer 1 has no samples"),
        ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
        ({"weight_decay": float("nan")}, "weight_decay must be a finite number >= 0"),
        ({"optimum": 3}, "optimum must be callable or None, got int"),
    ],
)
def test_validation_refuses_bad_new_fields(task: Task, change: dict, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        dataclasses.replace(task, **change).validate()
