"""Reading run folders back: simulated runs, swarms, and every way a folder can be unreadable."""

import json
import shutil

import pytest

from peer.config import SimulationConfig
from peer.runs import RunError, load_run
from peer.simulate import simulate

SMALL = dict(peers=3, topology="ring", partition="iid", rounds=3, local_steps=2, seed=0)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "a"
    simulate(SimulationConfig(**SMALL, out=folder, target_accuracy=0.05))
    return folder


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def test_a_simulated_run_reads_back_as_the_simulator_saw_it(simulated):
    run = load_run(simulated)
    summary = json.loads((simulated / "summary.json").read_text())
    assert [p.round for p in run.points] == [0, 1, 2]
    assert all(p.peers == 3 for p in run.points)
    assert not run.wall_clock
    last = run.points[-1]
    assert last.mean_accuracy == pytest.approx(summary["mean_accuracy"])
    assert last.bytes_sent == summary["bytes_sent_total"]
    assert [r for r, _ in run.consensus] == [0, 1, 2]
    assert run.consensus[-1][1] == pytest.approx(summary["consensus_distance"], rel=1e-5)
    # A target below chance is reached at once, and the summary says so in the same terms.
    assert summary["rounds_to_target"] == 1 and summary["bytes_to_target"] == run.points[0].bytes_sent
    assert summary["virtual_seconds_to_target"] == run.points[0].seconds


def test_a_swarm_folder_reads_its_peers_files(simulated, tmp_path):
    lines = (simulated / "metrics.jsonl").read_text().splitlines()
    folder = tmp_path / "swarm"
    for index in range(3):
        mine = [line for line in lines if json.loads(line)["peer"] == f"peer-{index}"]
        (folder / f"peer-{index}").mkdir(parents=True)
        (folder / f"peer-{index}" / "metrics.jsonl").write_text("\n".join(mine) + "\n")
    shutil.copy(simulated / "summary.json", folder)
    assert load_run(folder).points == load_run(simulated).points


def test_a_last_line_cut_short_is_left_out(simulated, tmp_path):
    folder = copy_of(simulated, tmp_path)
    with open(folder / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "peer": "peer-0", "accur')
    assert load_run(folder).points == load_run(simulated).points


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("not json at all", "not JSON"),
        ("[1, 2, 3]", "a JSON list, not an object"),
        ('{"round": "three", "peer": "p"}', "round"),
        ('{"peer": "p"}', "round: Field required"),
    ],
)
def test_a_malformed_metrics_line_is_named(simulated, tmp_path, line, reason):
    folder = copy_of(simulated, tmp_path)
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    lines[4] = line
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunError, match=rf"metrics.jsonl line 5 is not a metrics record \({reason}"):
        load_run(folder)


def test_an_accuracy_outside_zero_one_is_refused(simulated, tmp_path):
    folder = copy_of(simulated, tmp_path)
    record = json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])
    (folder / "metrics.jsonl").write_text(json.dumps({**record, "accuracy": 7.5}) + "\n")
    with pytest.raises(RunError, match="accuracy 7.5 is outside"):
        load_run(folder)


def test_missing_files_say_what_to_pass(simulated, tmp_path):
    with pytest.raises(RunError, match="is not a folder"):
        load_run(tmp_path / "nowhere")
    folder = copy_of(simulated, tmp_path)
    (folder / "metrics.jsonl").unlink()
    with pytest.raises(RunError, match=r"has no metrics.jsonl .*peer simulate --out"):
        load_run(folder)
    (folder / "summary.json").unlink()
    with pytest.raises(RunError, match="has no summary.json"):
        load_run(folder)


def test_a_damaged_summary_is_named(simulated, tmp_path):
    folder = copy_of(simulated, tmp_path)
    (folder / "summary.json").write_text("{ half")
    with pytest.raises(RunError, match="summary.json cannot be read"):
        load_run(folder)
    (folder / "summary.json").write_text('{"consensus_by_round": [1, 2]}')
    with pytest.raises(RunError, match="consensus_by_round is not a list"):
        load_run(folder)
