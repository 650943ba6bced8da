"""The local trainer: it learns, its state round-trips, and it respects the device setting."""

import pytest
import torch

from peer.config import ConfigError, SimulationConfig
from peer.flops import step_flops
from peer.lr_schedule import CosineDecay
from peer.simulate import COMPUTE_BOUND_FLOPS, build_trainers, training_engine
from peer.tasks import Task, load_task
from peer.trainer import Trainer, evaluation_rows, label_losses, resolve_device
from tests.helpers import blobs, make_trainer

torch.set_num_threads(1)  # the models here are tiny: more threads only contend on a shared machine


@pytest.mark.parametrize(
    "schedule, after_50, after_100",
    [(None, 0.1, 0.1), (CosineDecay(0, 100), 0.05, 0.0), (CosineDecay(0, 200), 0.0853553, 0.05), (CosineDecay(50, 150), 0.1, 0.05)],
)
def test_the_learning_rate_follows_the_schedule(schedule, after_50, after_100):
    trainer = make_trainer(schedule=schedule)
    trainer.train(51)  # the rate of step 50 is set before it runs
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(after_50, abs=1e-6)
    trainer.train(50)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(after_100, abs=1e-6)
    trainer.train(200)  # past the end of the schedule the rate stays at its floor
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 if schedule is None else 0.0, abs=1e-6)


def test_training_lowers_the_loss_and_raises_accuracy():
    trainer = make_trainer()
    accuracy_before, loss_before = trainer.evaluate()
    trainer.train(200)
    accuracy_after, loss_after = trainer.evaluate()
    assert loss_after < loss_before
    assert accuracy_after > max(accuracy_before, 0.6)
    assert trainer.steps_taken == 200


def test_state_is_a_snapshot_and_load_state_restores_it():
    trainer = make_trainer()
    snapshot = trainer.state()
    trainer.train(5)
    assert not torch.equal(snapshot["weight"], trainer.state()["weight"])
    trainer.load_state(snapshot)
    assert torch.equal(snapshot["weight"], trainer.state()["weight"])


def test_the_batch_order_depends_only_on_the_seed():
    first, second, other = make_trainer(seed=1), make_trainer(seed=1), make_trainer(seed=2)
    for trainer in (first, second, other):
        trainer.train(20)
    assert torch.equal(first.state()["weight"], second.state()["weight"])
    assert not torch.equal(first.state()["weight"], other.state()["weight"])


def test_a_batch_larger_than_the_data_uses_all_of_it():
    x, y = blobs(20)
    trainer = Trainer(torch.nn.Linear(2, 3), (x, y), (x, y), lr=0.1, momentum=0.0, weight_decay=0.0,
                      batch_size=64, seed=0, device=torch.device("cpu"))
    assert trainer.batch_size == 20
    trainer.train(3)


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(ConfigError, match="--device auto or cpu"):
            resolve_device("cuda")


def finite(state):
    return all(bool(torch.isfinite(t).all()) for t in state.values())


def test_training_that_overflows_rolls_back_to_the_last_finite_state():
    trainer = make_trainer(lr=1e38)  # the first step overflows float32
    before = trainer.state()
    trainer.train(5)
    assert trainer.rollbacks == 1
    assert all(torch.equal(before[name], tensor) for name, tensor in trainer.state().items())


def test_after_a_rollback_training_goes_on_from_the_last_finite_state():
    trainer = make_trainer()
    trainer.train(5)
    last_finite = trainer.state()
    with torch.no_grad():
        trainer.model.weight[0, 0] = float("inf")  # a NaN loss, NaN gradients, NaN momentum
    trainer.train(1)
    assert trainer.rollbacks == 1
    assert all(torch.equal(last_finite[name], tensor) for name, tensor in trainer.state().items())
    # The momentum of the NaN step is gone too, or the next step would be NaN again.
    trainer.train(20)
    assert trainer.rollbacks == 1 and finite(trainer.state())


def test_a_non_finite_state_is_not_loaded():
    trainer = make_trainer()
    trainer.train(5)
    kept = trainer.state()
    trainer.load_state({"weight": torch.full((3, 2), float("nan")), "bias": torch.zeros(3)})
    assert trainer.rollbacks == 1
    assert all(torch.equal(kept[name], tensor) for name, tensor in trainer.state().items())


def test_labels_per_position_have_a_loss_each_and_accuracy_counts_every_one():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0]], [[2.0, 0.0], [2.0, 0.0]]])  # (samples, positions, classes)
    labels = torch.tensor([[0, 1], [0, 1]])
    losses = label_losses(logits, labels)
    assert losses.shape == (2, 2)
    torch.testing.assert_close(losses[1, 1], torch.nn.functional.cross_entropy(torch.tensor([[2.0, 0.0]]), torch.tensor([1]))[()])
    x = torch.zeros(2, 2, dtype=torch.long)
    trainer = Trainer(
        _Fixed(logits), (x, labels), (x, labels), lr=0.1, momentum=0.0, weight_decay=0.0, batch_size=2, seed=0,
        device=torch.device("cpu"),
    )
    accuracy, loss = trainer.evaluate()
    assert accuracy == 0.75  # three of the four positions are right
    assert loss == pytest.approx(float(losses.mean()))


class _Fixed(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, x):
        return self.logits[: len(x)]


def test_an_adamw_trainer_uses_decoupled_decay_and_the_task_says_which_optimiser():
    trainer = make_trainer(optimizer="adamw", lr=0.01)
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and trainer.optimizer.defaults["betas"] == (0.9, 0.99)
    before = trainer.evaluate()[1]
    trainer.train(40)
    assert trainer.evaluate()[1] < before
    task = load_task("mnist1d")
    adamw = Task(**{**task.__dict__, "optimizer": "adamw", "learning_rate": 0.002})
    config = SimulationConfig(peers=2, partition="iid")
    assert [t.optimizer_kind for t in build_trainers(config, adamw, torch.device("cpu"))] == ["adamw", "adamw"]
    assert [t.lr for t in build_trainers(config, adamw, torch.device("cpu"))] == [0.002, 0.002]
    chosen = SimulationConfig(peers=2, partition="iid", optimizer="sgd")
    assert [t.optimizer_kind for t in build_trainers(chosen, adamw, torch.device("cpu"))] == ["sgd", "sgd"]


def test_eval_samples_takes_the_same_fixed_test_rows_for_every_peer():
    rows = evaluation_rows(1000, 100, seed=3)
    assert len(rows) == 100 and len(set(rows.tolist())) == 100 and rows.tolist() == sorted(rows.tolist())
    assert torch.equal(rows, evaluation_rows(1000, 100, seed=3))
    assert not torch.equal(rows, evaluation_rows(1000, 100, seed=4))
    assert evaluation_rows(1000, None, seed=3) is None and evaluation_rows(1000, 1000, seed=3) is None
    task = load_task("mnist1d")
    trainers = build_trainers(SimulationConfig(peers=3, eval_samples=100, seed=3), task, torch.device("cpu"))
    assert all(torch.equal(t.test_y, task.test_y[rows]) for t in trainers)
    # One copy of the subset for the whole run, not one per peer.
    assert len({t.test_x.data_ptr() for t in trainers}) == 1


def test_a_step_is_counted_in_flops_and_only_big_steps_train_one_by_one_on_a_cpu():
    task = load_task("mnist1d")
    flops = step_flops(task, 32)
    assert flops == 2 * step_flops(task, 16) > 0  # forward and backward scale with the batch
    config = SimulationConfig(peers=4)
    cpu = torch.device("cpu")
    assert training_engine(config, task, cpu, flops) is None
    assert "GFLOP, enough to keep every core busy" in training_engine(config, task, cpu, COMPUTE_BOUND_FLOPS)
    assert training_engine(SimulationConfig(peers=4, engine="batched"), task, cpu, COMPUTE_BOUND_FLOPS) is None
