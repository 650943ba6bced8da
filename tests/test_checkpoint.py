"""Checkpoints: written atomically, read back whole or refused with the reason, and training goes on from them exactly."""

import json
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch
from safetensors.torch import save_file

from gossip.neighbourhood import GraphNeighbourhood
from gossip.protocols import MoDeST, ModestSettings, ProtocolContext
from gossip.protocols.dpsgd import DPSGD
from gossip.settings import GossipSettings
from gossip.view import Entry
from peer.checkpoint import (
    FILE,
    Checkpoint,
    CheckpointError,
    check_fits,
    check_progress,
    read_checkpoint,
    read_model,
    write_checkpoint,
)
from peer.metrics import MetricsLog, RoundRecord
from peer.net.node import resume_training
from peer.sim import LinkModel, SimClock, SimNetwork
from tests.helpers import make_trainer, run
from tests.vector_learner import VectorLearner
from topology.schedule import parse_topology

torch.set_num_threads(1)


def checkpoint(round_=7, model=None, **fields):
    return Checkpoint(
        round_, model or {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)},
        {"counters": torch.tensor([70, 3, 0])}, {"view": torch.arange(4, dtype=torch.uint8)}, {"note": [1, "x"]},
        fingerprint="abc", task="mnist1d", algorithm="dpsgd", metrics_bytes=123, **fields,
    )


def test_a_checkpoint_reads_back_as_it_was_written(tmp_path):
    written = checkpoint()
    assert write_checkpoint(tmp_path, written)
    read = read_checkpoint(tmp_path)
    assert (read.round, read.fingerprint, read.task, read.algorithm, read.metrics_bytes, read.protocol_meta) == (
        7, "abc", "mnist1d", "dpsgd", 123, {"note": [1, "x"]}
    )
    for part in ("model", "training", "protocol"):
        ours, theirs = getattr(written, part), getattr(read, part)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(read_model(tmp_path / FILE)["w"], written.model["w"])
    assert [p.name for p in tmp_path.iterdir()] == [FILE]  # no temporary file left behind


def test_a_non_finite_model_is_never_written_and_the_previous_checkpoint_stays(tmp_path):
    assert write_checkpoint(tmp_path, checkpoint(3))
    assert not write_checkpoint(tmp_path, checkpoint(4, {"w": torch.tensor([1.0, float("nan")])}))
    assert read_checkpoint(tmp_path).round == 3


def test_a_write_that_fails_for_lack_of_space_keeps_the_previous_checkpoint(tmp_path):
    assert write_checkpoint(tmp_path, checkpoint(3))
    before = (tmp_path / FILE).read_bytes()
    # A real failed write: the file size limit makes the kernel refuse the bytes past it (EFBIG),
    # as a full disk refuses them (ENOSPC).
    script = f"""
import resource, signal, sys, torch
from pathlib import Path
from tests.test_checkpoint import checkpoint
from peer.checkpoint import write_checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))
sys.exit(0 if write_checkpoint(Path({str(tmp_path)!r}), checkpoint(4, {{"w": torch.ones(1000)}})) else 3)
"""
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert "could not write a checkpoint" in result.stderr and "the previous one is kept" in result.stderr
    assert (tmp_path / FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [FILE]


def test_a_missing_truncated_or_foreign_checkpoint_is_refused_with_the_reason(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in .*without --resume"):
        read_checkpoint(tmp_path)
    write_checkpoint(tmp_path, checkpoint())
    data = (tmp_path / FILE).read_bytes()
    (tmp_path / FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or cut short"):
        read_checkpoint(tmp_path)
    save_file({"weight": torch.ones(2)}, str(tmp_path / FILE))  # some other program's safetensors file
    with pytest.raises(CheckpointError, match="not a checkpoint this program can resume from"):
        read_checkpoint(tmp_path)
    (tmp_path / FILE).write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError, match="damaged or cut short"):
        read_checkpoint(tmp_path)


def test_a_checkpoint_of_another_task_protocol_or_model_does_not_fit():
    saved = checkpoint()
    fits = {"fingerprint": "abc", "task": "mnist1d", "algorithm": "dpsgd", "model": saved.model}
    check_fits(saved, **fits)
    with pytest.raises(CheckpointError, match="task 'mnist1d'.*trains 'fashion-mnist'"):
        check_fits(saved, **{**fits, "task": "fashion-mnist"})
    with pytest.raises(CheckpointError, match="'dpsgd' peer.*runs 'modest'"):
        check_fits(saved, **{**fits, "algorithm": "modest"})
    with pytest.raises(CheckpointError, match="model does not match.*differs at w"):
        check_fits(saved, **{**fits, "model": {"w": torch.zeros(3, 3), "b": torch.ones(2)}})
    with pytest.raises(CheckpointError, match="exchanges models another way"):
        check_fits(saved, **{**fits, "fingerprint": "other"})


def test_a_checkpoint_whose_model_is_finite_but_absurd_is_refused_and_nothing_is_loaded():
    trainer = make_trainer()
    fresh = {name: t.clone() for name, t in trainer.state().items()}
    absurd = checkpoint(model={name: torch.full_like(t, 1e30) for name, t in fresh.items()})
    with pytest.raises(CheckpointError, match=r"model is 3e\+30 away from a fresh one, beyond the .* outlier guard"):
        resume_training(absurd, trainer, "mnist1d", "dpsgd", "abc")
    assert all(torch.equal(trainer.state()[name], fresh[name]) for name in fresh)


def test_a_checkpoint_of_a_trained_model_is_within_the_guards_bound_and_is_loaded():
    trained = make_trainer(seed=4)
    trained.train(60)
    saved = checkpoint(model=trained.state())
    saved.training = trained.training_state()
    trainer = make_trainer()
    resume_training(saved, trainer, "mnist1d", "dpsgd", "abc")
    assert all(torch.equal(trainer.state()[name], trained.state()[name]) for name in saved.model)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_training_goes_on_from_a_checkpoint_exactly_as_if_it_had_not_stopped(optimizer):
    going_on = make_trainer(seed=5, optimizer=optimizer)
    going_on.train(23)  # within an epoch of batches, with momentum built up
    saved_model, saved_training = going_on.state(), going_on.training_state()
    going_on.train(40)
    restarted = make_trainer(seed=99, optimizer=optimizer)  # another generator: what it draws must come from the checkpoint
    restarted.load_training_state(saved_training)
    restarted.load_state(saved_model)
    restarted.train(40)
    assert restarted.steps_taken == going_on.steps_taken == 63
    assert all(torch.equal(restarted.state()[k], going_on.state()[k]) for k in saved_model)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda t: t.pop("counters"), "counters"),
        (lambda t: t.update({"momentum.0": torch.ones(7)}), "momentum 'momentum.0' does not fit"),
        (lambda t: t.update({"momentum.9": torch.ones(3, 2)}), "parameter the model does not have"),
        (lambda t: t.update({"batch_order": torch.tensor([0, 5000])}), "batch order"),
        (lambda t: t.update({"generator": torch.zeros(3, dtype=torch.uint8)}), "generator"),
        (lambda t: t.update({"exp_avg.0": torch.ones(3, 2)}), "belongs to another optimiser than sgd"),
    ],
)
def test_a_training_state_that_does_not_fit_is_refused_and_changes_nothing(damage, reason):
    source = make_trainer()
    source.train(5)
    tensors = source.training_state()
    damage(tensors)
    target = make_trainer(seed=3)
    target.train(2)
    before = (target.training_state(), target.state())
    with pytest.raises(ValueError, match=reason):
        target.load_training_state(tensors)
    after = (target.training_state(), target.state())
    for old, new in zip(before, after):
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)


def record(round_, accuracy=None):
    return RoundRecord(round_, "p", accuracy, None, 1.0, 10 * round_, 0, 0.0, 2, 1, 0, local_steps=5)


def test_the_metrics_log_goes_on_from_the_checkpoints_length_and_drops_what_came_after(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = MetricsLog(path)
    for round_ in range(3):
        first.write(record(round_, 0.5))
    kept = first.bytes_written
    first.write(record(3, 0.6))  # written after the checkpoint, before the crash
    first.close()
    resumed = MetricsLog.resumed(path, kept)
    assert resumed.latest["p"].round == 2 and resumed.local_steps == 15 and resumed.missed_exchanges == 3
    resumed.write(record(3, 0.7))
    resumed.close()
    assert [json.loads(line)["accuracy"] for line in path.read_text().splitlines()] == [0.5, 0.5, 0.5, 0.7]
    with pytest.raises(Exception, match="keeps 10000 bytes of .*, which holds only"):
        MetricsLog.resumed(path, 10_000)


def log_of(path, rounds):
    """A metrics log holding ``rounds`` in that order, and where each of its lines ends."""
    log, ends = MetricsLog(path), []
    for round_ in rounds:
        log.write(record(round_))
        ends.append(log.bytes_written)
    log.close()
    return ends


def test_a_checkpoint_past_the_runs_last_round_is_refused_saying_how_many_rounds_the_run_has(tmp_path):
    (tmp_path / "metrics.jsonl").touch()
    write_checkpoint(tmp_path, replace(checkpoint(10**12), metrics_bytes=0))
    with pytest.raises(CheckpointError, match="goes on from round 1000000000000, and this run has 5 rounds"):
        check_progress(read_checkpoint(tmp_path), tmp_path / "metrics.jsonl", rounds=5)
    check_progress(replace(checkpoint(5), metrics_bytes=0), tmp_path / "metrics.jsonl", rounds=5)  # a finished run


@pytest.mark.parametrize(
    "kept, reason",
    [
        (lambda ends: 0, "round 3, yet would drop line 1 of .*, of round 0"),
        (lambda ends: ends[1], "round 3, yet would drop line 3 of .*, of round 2"),
        (lambda ends: ends[3], "round 3, yet keeps line 4 of .*, of round 3"),
        (lambda ends: ends[2] - 1, "keeps .* bytes of .*, which end within line 3"),
        (lambda ends: ends[-1] + 1, r"keeps .* bytes of .*, which holds only \d+"),
    ],
    ids=["nothing", "a round short", "a round over", "within a line", "past the end"],
)
def test_a_checkpoint_that_keeps_another_part_of_the_log_than_its_rounds_is_refused_and_nothing_changes(
    tmp_path, kept, reason
):
    path = tmp_path / "metrics.jsonl"
    ends = log_of(path, range(5))
    write_checkpoint(tmp_path, replace(checkpoint(3), metrics_bytes=kept(ends)))
    before = {name: (tmp_path / name).read_bytes() for name in (FILE, "metrics.jsonl")}
    with pytest.raises(CheckpointError, match=f"--resume: .*{reason}; remove the checkpoint .* to start afresh"):
        check_progress(read_checkpoint(tmp_path), path, rounds=5)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_a_checkpoint_that_keeps_its_rounds_of_the_log_passes_though_a_crash_cut_the_last_line_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    ends = log_of(path, range(3))
    with open(path, "ab") as f:
        f.write(b'{"round": 3, "pe')
    check_progress(replace(checkpoint(3), metrics_bytes=ends[2]), path, rounds=5)
    check_progress(replace(checkpoint(2), metrics_bytes=ends[1]), path, rounds=5)


def test_aggregations_and_token_visits_may_record_rounds_below_the_checkpoints_after_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    ends = log_of(path, [0, 5, 3, 2])
    check_progress(replace(checkpoint(4), metrics_bytes=ends[2]), path, rounds=9, ordered=False)
    with pytest.raises(CheckpointError, match="would drop line 4 of .*, of round 2"):
        check_progress(replace(checkpoint(4), metrics_bytes=ends[2]), path, rounds=9)


@pytest.mark.parametrize(
    "kept_lines, damaged, line",
    [(3, 2, b"not a record"), (2, 3, json.dumps({**asdict(record(2)), "round": "2"}).encode())],
    ids=["kept", "the next one"],
)
def test_a_damaged_line_of_the_log_is_refused_with_its_number(tmp_path, kept_lines, damaged, line):
    lines = [json.dumps(asdict(record(round_))).encode() + b"\n" for round_ in range(3)]
    lines[damaged - 1] = line + b"\n"
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"".join(lines))
    kept = sum(len(each) for each in lines[:kept_lines])
    with pytest.raises(CheckpointError, match=f"metrics.jsonl line {damaged} is damaged"):
        check_progress(replace(checkpoint(kept_lines), metrics_bytes=kept), path, rounds=5)


@pytest.mark.network  # a real peer process
def test_a_real_peer_goes_on_from_the_checkpoint_it_wrote(tmp_path):
    options = ["--local-steps", "2", "--partition", "iid", "--checkpoint-every", "1", "--out", str(tmp_path)]
    code, _, err = run(["run", "--rounds", "2", *options], timeout=240)
    assert code == 0, err
    check_progress(read_checkpoint(tmp_path), tmp_path / "metrics.jsonl", rounds=2)
    code, _, err = run(["run", "--resume", "--rounds", "3", *options], timeout=240)
    assert code == 0, err
    assert [json.loads(line)["round"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert json.loads((tmp_path / "summary.json").read_text())["resumed_from_round"] == 2


def protocol_of(algorithm, me="p00"):
    network = SimNetwork(LinkModel(latency=0.01))
    learner = VectorLearner(torch.zeros(2))

    async def finished(report):
        pass

    peers = ["p00", "p01", "p02"]
    neighbourhood = GraphNeighbourhood(parse_topology("ring", 3), peers, me)
    context = ProtocolContext(network.attach(me), SimClock(), learner, neighbourhood, finished, GossipSettings())
    if algorithm == "modest":
        return MoDeST(context, local_steps=1, settings=ModestSettings(), peers=peers)
    return DPSGD(context, local_steps=1)


def test_modest_keeps_its_view_in_the_checkpoint():
    saved = protocol_of("modest")
    saved.view.merge({"p01": Entry(12, 1), "p02": Entry(9, 2, left=True), "p07": Entry(11)})
    tensors, meta = saved.save_state()
    restored = protocol_of("modest")
    restored.restore_state(tensors, meta)
    assert restored.view.entries["p01"] == Entry(12, 1) and restored.view.entries["p07"] == Entry(11)
    assert restored.view.left("p02") and restored.view.estimate() == 12
    with pytest.raises(ValueError, match="saved view is damaged"):
        protocol_of("modest").restore_state({"view": torch.tensor([1.0])}, {})


def test_a_protocol_that_keeps_no_state_refuses_a_checkpoint_that_holds_some():
    protocol = protocol_of("dpsgd")
    assert protocol.save_state() == ({}, {})
    protocol.restore_state({}, {})
    with pytest.raises(ValueError, match="keeps no state"):
        protocol.restore_state({"view": torch.ones(1)}, {})


def test_an_adamw_state_keeps_both_moments_and_the_step_of_every_parameter():
    trainer = make_trainer(optimizer="adamw", lr=0.01)
    trainer.train(3)
    state = trainer.training_state()
    assert sorted(name for name in state if "." in name) == [
        "exp_avg.0", "exp_avg.1", "exp_avg_sq.0", "exp_avg_sq.1", "step.0", "step.1",
    ]
    assert float(state["step.0"]) == 3
    damaged = {**state, "exp_avg_sq.1": torch.full((3,), float("nan"))}
    with pytest.raises(ValueError, match="exp_avg_sq 'exp_avg_sq.1' does not fit the model, or is not finite"):
        make_trainer(optimizer="adamw").load_training_state(damaged)
