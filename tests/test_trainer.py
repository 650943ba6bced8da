"""The local trainer: it learns, its state round-trips, and it respects the device setting."""

import pytest
import torch

from peer.config import ConfigError
from peer.lr_schedule import CosineDecay
from peer.trainer import Trainer, resolve_device
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
