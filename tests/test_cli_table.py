"""The result table of `peer simulate` and `peer swarm`, and the progress bars."""

import io

import pytest
from rich.console import Console
from rich.progress import TimeElapsedColumn, TimeRemainingColumn

from peer.cli import _progress, _summary_table, main
from peer.config import SimulationConfig, SwarmConfig
from peer.curve import CurvePoint, Target, time_to_target
from peer.summary import summary as common_summary


def rows(summary):
    """The table of ``summary`` as {row name: value}, and its title."""
    console = Console(record=True, width=160, file=io.StringIO())
    console.print(_summary_table(summary))
    lines = console.export_text().splitlines()
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
    return lines[0].strip(), dict(cells)


def swarm_summary(**changes):
    """A swarm's summary, built as ``run_swarm`` builds it: wall-clock figures, no simulated ones."""
    config = SwarmConfig(peers=3, rounds=3, target_accuracy=0.5)
    points = [
        CurvePoint(round=0, peers=3, mean_accuracy=0.3, min_accuracy=0.2, max_accuracy=0.4, bytes_sent=4_000_000, seconds=6.0),
        CurvePoint(round=1, peers=3, mean_accuracy=0.55, min_accuracy=0.5, max_accuracy=0.6, bytes_sent=8_000_000, seconds=12.5),
    ]
    summary = common_summary(
        config, peers=3, rounds_completed=3, accuracies=[0.6, 0.61, 0.62], losses=[1.0, 1.1, 1.2],
        bytes_sent=12_340_000, bytes_received=12_340_000, rejected=0, missed_exchanges=1, local_steps=90,
        wall_seconds=42.0, to_target=time_to_target(points, Target.of(config), wall_clock=True),
    )
    summary.update(
        peers_finished=3, failed_peers={}, consensus_distance=0.125, last_round=2, speeds="same",
        slowdowns=[1.0, 1.0, 1.0], mean_accuracy_slow=None, mean_accuracy_fast=0.61, interrupted=False,
        out="runs/swarm-20250101-120000",
    )
    return summary | changes


def test_a_swarms_table_shows_wall_clock_figures_and_no_simulated_ones():
    title, table = rows(swarm_summary())
    assert title == "D-PSGD (decentralised gossip)"
    assert table == {
        "task / partition": "mnist1d / dirichlet:0.5",
        "peers / topology": "3 / ring",
        "rounds x local steps": "3 x 10",
        "codec / error feedback": "none / none",
        "test accuracy: mean": "0.6100",
        "test accuracy: min / max": "0.6000 / 0.6200",
        "test loss: mean": "1.1000",
        "consensus distance": "0.125",
        "bytes sent, all peers": "12.34 MB",
        "missed exchanges": "1",
        "peers finished": "3 of 3",
        "wall time": "42.0 s",
        "to mean accuracy 0.5": "after 2 rounds, 8.00 MB, 12.5 s wall clock",
    }


def test_a_swarms_table_says_which_peers_failed_how_it_ended_and_how_the_slow_peers_did():
    summary = swarm_summary(
        peers_finished=2, failed_peers={"peer-2": -9}, interrupted=True, speeds="stragglers:0.34:4",
        mean_accuracy_slow=0.5, mean_accuracy_fast=0.6, rounds_to_target=None, bytes_to_target=None,
        wall_seconds_to_target=None,
    )
    _, table = rows(summary)
    assert table["speeds: stragglers:0.34:4"] == "the slow peers at 0.5000, the others at 0.6000"
    assert table["peers finished"] == "2 of 3"
    assert table["failed peers"] == "peer-2 (exit code -9)"
    assert table["interrupted"] == "by Ctrl-C; 3 rounds completed"
    assert table["to mean accuracy 0.5"] == "not reached"


def test_a_loss_target_has_its_row_to_mean_loss_in_the_table_and_no_accuracy_row():
    config = SwarmConfig(peers=3, rounds=3, target_loss=0.6)
    points = [
        CurvePoint(round=0, peers=3, mean_accuracy=0.3, min_accuracy=0.2, max_accuracy=0.4, bytes_sent=4_000_000,
                   seconds=6.0, mean_loss=0.9, min_loss=0.8, max_loss=1.0),
        CurvePoint(round=1, peers=3, mean_accuracy=0.55, min_accuracy=0.5, max_accuracy=0.6, bytes_sent=8_000_000,
                   seconds=12.5, mean_loss=0.55, min_loss=0.5, max_loss=0.6),
    ]
    _, table = rows(swarm_summary(**time_to_target(points, Target.of(config), wall_clock=True)))
    assert table["to mean loss 0.6"] == "after 2 rounds, 8.00 MB, 12.5 s wall clock"
    assert not any(name.startswith("to mean accuracy") for name in table)
    _, unreached = rows(swarm_summary(**time_to_target(points[:1], Target.of(config), wall_clock=True)))
    assert unreached["to mean loss 0.6"] == "not reached"


def test_a_simulations_table_shows_simulated_time_and_the_training_engine():
    from peer.simulate import simulate

    config = SimulationConfig(
        peers=3, rounds=2, local_steps=1, partition="iid", target_accuracy=0.01, threads=1, device="cpu"
    )
    summary = simulate(config).summary
    _, table = rows(summary)
    assert table["simulated time"] == f"{summary['virtual_seconds']:.1f} s"
    assert table["training engine"] == "batched, 1 thread"
    assert table["to mean accuracy 0.01"].endswith(f", {summary['virtual_seconds_to_target']:.1f} s simulated")
    assert "peers finished" not in table and "failed peers" not in table


@pytest.mark.parametrize(
    "changes, code",
    [({}, 0), ({"failed_peers": {"peer-1": 1}, "peers_finished": 2}, 1), ({"interrupted": True}, 130)],
)
def test_peer_swarm_prints_the_table_then_where_its_summary_is(monkeypatch, capsys, changes, code):
    import peer.net.swarm

    monkeypatch.setattr(peer.net.swarm, "run_swarm", lambda config, on_progress: swarm_summary(**changes))
    assert main(["swarm", "--peers", "3", "--rounds", "3"]) == code
    out = capsys.readouterr().out
    assert "D-PSGD (decentralised gossip)" in out and "wall clock" in out and "{" not in out
    assert out.endswith("\nsummary: runs/swarm-20250101-120000/summary.json\n")


def rendered_progress(width):
    """A progress bar 10 s into a task half done, 4 steps of it in the last 8 s: 10 s left."""
    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=True)
    progress = _progress(console)
    now = [0.0]
    progress.get_time = lambda: now[0]
    bar = progress.add_task("simulating", total=10, status="round 5/10  peer-15 acc 0.838")
    for moment, done in ((2.0, 1), (10.0, 5)):
        now[0] = moment
        progress.update(bar, completed=done)
    console.print(progress.make_tasks_table(progress.tasks))
    return console.export_text(), [type(column) for column in progress.columns]


def test_progress_bars_show_the_time_left_beside_the_time_elapsed():
    text, kinds = rendered_progress(width=120)
    assert text.rstrip().endswith("5/10 round 5/10  peer-15 acc 0.838 0:00:10 elapsed, 0:00:10 left")
    assert kinds.index(TimeRemainingColumn) == kinds.index(TimeElapsedColumn) + 2


def test_a_narrow_terminal_shows_both_times_without_their_labels():
    text, kinds = rendered_progress(width=80)
    assert text.rstrip().endswith("5/10 round 5/10  peer-15 acc 0.838 0:00:10 0:00:10")
    assert kinds.index(TimeRemainingColumn) == kinds.index(TimeElapsedColumn) + 1
