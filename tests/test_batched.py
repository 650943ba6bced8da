"""The batched engine: one vmapped step over the stacked models must train each peer exactly as it
would train alone, batch whoever is due together, and refuse models it cannot run."""

import asyncio
import sys
import textwrap

import pytest
import torch
from torch import nn

from peer.config import SimulationConfig
from peer.sim import SimClock, SpeedProfile, VirtualTimeLoop
from peer.sim.batched import BatchedTraining, BatchingError, StackedTrainer, batching_refusal
from peer.simulate import build_trainers, simulate
from peer.tasks import Task, load_task
from peer.tasks.augment import CropAndFlip
from peer.trainer import Trainer

torch.set_num_threads(1)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def task():
    return load_task("mnist1d", None)


def twins(task, **settings) -> tuple[list[Trainer], list[StackedTrainer], BatchedTraining]:
    """The same peers twice: trainers alone, and trainers on one batched engine."""
    config = SimulationConfig(**{"peers": 4, "partition": "dirichlet:0.5", "rounds": 5, "local_steps": 4, **settings})
    alone = build_trainers(config, task, CPU)
    stacked = build_trainers(config, task, CPU, trainer_class=StackedTrainer)
    return alone, stacked, BatchedTraining(stacked, workers=settings.get("threads", 1), chunk=2)


def assert_same_models(alone: list[Trainer], stacked: list[StackedTrainer]) -> None:
    for one, other in zip(alone, stacked):
        for name, tensor in one.state().items():
            torch.testing.assert_close(other.state()[name], tensor, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"algorithm": "dfedsam", "sam_rho": 0.5},  # SAM's norm is each peer's own
        {"weight_decay": 0.01, "momentum": 0.0, "lr_schedule": "cosine:0.1"},
        {"batch_size": "second-smallest shard"},  # the smallest shards take full-batch steps, the others not
        {"threads": 2},  # chunks on two threads
        {"optimizer": "adamw", "lr": 0.003, "weight_decay": 0.1},  # AdamW's moments and bias correction per peer
        {"optimizer": "adamw", "lr": 0.003, "batch_size": "second-smallest shard"},
    ],
    ids=["plain", "sam", "decay-schedule", "full-batch", "threads", "adamw", "adamw-full-batch"],
)
def test_a_batched_step_trains_each_peer_as_it_would_alone(task, settings):
    if settings.get("batch_size"):
        settings = {**settings, "batch_size": sorted(len(t.train_y) for t in twins(task)[0])[1]}
    alone, stacked, engine = twins(task, **settings)
    for _ in range(3):  # the momentum and the schedule carry over from one call to the next
        losses_alone = [trainer.train(4) for trainer in alone]
        losses_stacked = engine.run([(trainer, 4) for trainer in stacked])
        assert losses_stacked == pytest.approx(losses_alone, rel=1e-4)
    assert_same_models(alone, stacked)
    assert [t.steps_taken for t in stacked] == [12] * 4
    assert engine.peer_steps == 4 * 12
    engine.close()


def test_peers_asking_for_different_numbers_of_steps_train_in_one_call(task):
    alone, stacked, engine = twins(task)
    steps = [1, 3, 3, 6]
    losses = engine.run(list(zip(stacked, steps)))
    assert losses == pytest.approx([trainer.train(k) for trainer, k in zip(alone, steps)], rel=1e-4)
    assert_same_models(alone, stacked)


def test_what_a_peer_does_with_its_own_row_reaches_the_engine(task):
    alone, stacked, engine = twins(task)
    state = alone[1].state()
    stacked[0].load_state(state)  # into row 0 of the stack
    torch.testing.assert_close(engine.weights["0.weight"][0], state["0.weight"])
    stacked[0].train(2)
    stacked[0].reset_optimizer()
    assert all(float(buffer[0].abs().sum()) == 0 for buffer in engine.momentum.values())
    assert any(float(buffer[1].abs().sum()) == 0 for buffer in engine.momentum.values())  # untouched: never trained
    assert stacked[0].evaluate() == pytest.approx(Trainer.evaluate(stacked[0]))


def test_a_peer_that_diverges_is_rolled_back_alone(task):
    _, stacked, engine = twins(task)
    huge = {name: torch.full_like(tensor, 1e30) for name, tensor in stacked[0].state().items()}
    stacked[0].load_state(huge)
    before = [trainer.state() for trainer in stacked]
    engine.run([(trainer, 2) for trainer in stacked])
    assert [trainer.rollbacks for trainer in stacked] == [1, 0, 0, 0]
    for name, tensor in before[0].items():
        assert torch.equal(stacked[0].state()[name], tensor)
    assert all(float(buffer[0].abs().sum()) == 0 for buffer in engine.momentum.values())
    assert not torch.equal(stacked[1].state()["0.weight"], before[1]["0.weight"])


def test_training_asked_for_through_the_clock_runs_together_and_ends_on_each_peers_time(task):
    alone, stacked, engine = twins(task)
    runs = []
    original = engine.run
    engine.run = lambda work: runs.append(len(work)) or original(work)
    clocks = [SimClock(SpeedProfile(seconds), engine=engine) for seconds in (0.01, 0.01, 0.02, 0.5)]

    async def peer(index: int, wait: float) -> tuple[float, float]:
        await asyncio.sleep(wait)
        loss = await clocks[index].compute(stacked[index].train, 3, steps=3)
        return loss, clocks[index].now()

    async def swarm():
        # Peer 3 asks after the first three are due to finish: it trains in a later call.
        return await asyncio.gather(peer(0, 0.0), peer(1, 0.0), peer(2, 0.01), peer(3, 0.05))

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        results = runner.run(swarm())
    assert runs == [3, 1]
    assert [at for _, at in results] == pytest.approx([0.03, 0.03, 0.07, 1.55])
    assert [loss for loss, _ in results] == pytest.approx([trainer.train(3) for trainer in alone], rel=1e-4)


def test_reading_a_model_whose_training_is_pending_runs_the_training_first(task):
    alone, stacked, engine = twins(task)
    clock = SimClock(SpeedProfile(1.0), engine=engine)

    async def ask_then_read():
        training = asyncio.ensure_future(clock.compute(stacked[0].train, 2, steps=2))
        await asyncio.sleep(0)
        assert engine.is_pending(stacked[0]) and not engine.is_pending(stacked[1])
        read = stacked[0].state()  # the training has happened by now, as it has for a peer training alone
        await training
        return read

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        read = runner.run(ask_then_read())
    alone[0].train(2)
    torch.testing.assert_close(read["0.weight"], alone[0].state()["0.weight"], atol=2e-5, rtol=1e-4)


class WithDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(40, 10)

    def forward(self, x):
        return nn.functional.dropout(self.linear(x.flatten(1)), 0.5, self.training)


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (nn.Sequential(nn.Flatten(), nn.Linear(40, 10)), None),
        (nn.Sequential(nn.Conv1d(1, 2, 3), nn.BatchNorm1d(2), nn.Flatten(), nn.Linear(76, 10)), "buffers"),
        (WithDropout(), "vmap cannot run the model"),
    ],
    ids=["linear", "batchnorm", "dropout"],
)
def test_models_the_engine_cannot_run_are_found_before_a_run(task, model, reason):
    refusal = batching_refusal(model, task.train_x[:4])
    assert refusal is None if reason is None else reason in refusal


USER_TASKS = """
import torch
from peer.tasks import Task

def normalised(data_dir):
    generator = torch.Generator().manual_seed(0)
    return Task(
        name="normalised", train_x=torch.randn(64, 4, generator=generator), train_y=torch.arange(64) % 3,
        test_x=torch.randn(12, 4, generator=generator), test_y=torch.arange(12) % 3, num_classes=3,
        make_model=lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)),
    )
"""


def test_a_model_with_batchnorm_trains_per_peer_with_a_notice_or_is_refused(tmp_path, monkeypatch, caplog):
    (tmp_path / "batchnorm_tasks.py").write_text(textwrap.dedent(USER_TASKS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "batchnorm_tasks", raising=False)
    settings = {
        "peers": 3, "task": "batchnorm_tasks:normalised", "partition": "iid", "rounds": 2, "local_steps": 2, "batch_size": 8
    }
    summary = simulate(SimulationConfig(**settings)).summary
    assert summary["engine"] == "per-peer" and "buffers" in summary["engine_notice"]
    assert "each peer trains alone" in caplog.text
    with pytest.raises(BatchingError, match="--engine batched: the model has buffers"):
        simulate(SimulationConfig(**settings, engine="batched"))


SMALL = {"peers": 6, "partition": "dirichlet:0.5", "rounds": 6, "local_steps": 3, "seed": 1}


@pytest.mark.parametrize(
    ("algorithm", "extra"),
    [
        ("dpsgd", {}),
        ("dfedsam", {}),
        ("modest", {"sample_size": 3}),
        ("srrw", {"srrw_stay": 0.1}),
        ("async-gossip", {"speeds": "stragglers:0.34:3", "local_steps": "adaptive:3"}),
        ("fedavg", {}),
    ],
)
def test_every_protocol_runs_unchanged_on_the_batched_engine(algorithm, extra):
    config = {**SMALL, "algorithm": algorithm, **extra}
    batched = simulate(SimulationConfig(**config, engine="batched")).summary
    alone = simulate(SimulationConfig(**config, engine="per-peer")).summary
    assert batched["engine"] == "batched" and alone["engine"] == "per-peer"
    assert batched["local_steps_total"] == alone["local_steps_total"]
    assert batched["rounds_completed"] == alone["rounds_completed"]
    # The same batches and the same arithmetic, summed in another order: the runs stay close.
    assert batched["mean_accuracy"] == pytest.approx(alone["mean_accuracy"], abs=0.03)


def test_a_batched_run_is_the_same_for_the_same_seed(tmp_path):
    first = simulate(SimulationConfig(**SMALL, engine="batched", out=tmp_path / "a")).summary
    second = simulate(SimulationConfig(**SMALL, engine="batched", out=tmp_path / "b")).summary
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()
    assert first["mean_accuracy"] == second["mean_accuracy"]


def test_the_engine_settings_are_checked():
    with pytest.raises(ValueError, match="engine"):
        SimulationConfig(engine="vectorised")
    with pytest.raises(ValueError, match="threads"):
        SimulationConfig(threads=0)


def tiny_images() -> Task:
    """uint8 RGB images with a crop-and-flip augmentation and a GroupNorm CNN that scales them."""
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (120, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = (images.float().mean(dim=(1, 2, 3)) > 127.5).long()
    return Task(
        "tiny-images", images[:100], labels[:100], images[100:], labels[100:], 2,
        lambda: nn.Sequential(
            Scale(), nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 2)
        ),
        augmentation=CropAndFlip(2),
    )


class Scale(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255


def tiny_text() -> Task:
    """Token windows with a label per position, learnt by an embedding and a linear head with AdamW."""
    generator = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 5, (90, 9), generator=generator)
    return Task(
        "tiny-text", tokens[:80, :-1], tokens[:80, 1:], tokens[80:, :-1], tokens[80:, 1:], 5,
        lambda: nn.Sequential(nn.Embedding(5, 6), nn.Linear(6, 5)),
        optimizer="adamw", learning_rate=0.01, groups=torch.arange(80) % 4,
    )


@pytest.mark.parametrize("make_task", [tiny_images, tiny_text], ids=["augmented-images", "labels-per-position"])
def test_augmented_images_and_labels_per_position_train_batched_as_alone(make_task):
    task = make_task()
    task.validate()
    config = SimulationConfig(peers=3, partition="iid", rounds=2, local_steps=3, batch_size=8)
    alone = build_trainers(config, task, CPU)
    stacked = build_trainers(config, task, CPU, trainer_class=StackedTrainer)
    engine = BatchedTraining(stacked, chunk=2)
    for _ in range(2):
        losses_alone = [trainer.train(3) for trainer in alone]
        assert engine.run([(trainer, 3) for trainer in stacked]) == pytest.approx(losses_alone, rel=1e-4)
    assert_same_models(alone, stacked)
    assert [one.evaluate() for one in alone] == [pytest.approx(other.evaluate(), rel=1e-5) for other in stacked]
    engine.close()


def test_an_adamw_peer_whose_optimiser_is_reset_starts_its_moments_and_step_count_afresh(task):
    alone, stacked, engine = twins(task, optimizer="adamw", lr=0.003)
    engine.run([(trainer, 4) for trainer in stacked])
    stacked[0].reset_optimizer()
    assert float(engine.adam_steps[0]) == 0 and float(engine.adam_steps[1]) == 4
    assert all(float(stack[0].abs().sum()) == 0 for stack in (*engine.momentum.values(), *engine.second_moment.values()))
    for trainer in alone:
        trainer.train(4)
    alone[0].reset_optimizer()
    for trainer in alone:
        trainer.train(2)
    engine.run([(trainer, 2) for trainer in stacked])
    assert_same_models(alone, stacked)
    engine.close()
