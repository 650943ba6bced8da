"""Figures of runs and topologies: what they are labelled with, and that they are written."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from peer.cli import main
from peer.config import ConfigError, SimulationConfig
from peer.plot import communication_graph, describe, plot_runs, plot_topology
from peer.runs import load_run
from peer.simulate import simulate
from topology import parse_topology

SMALL = dict(peers=3, topology="ring", partition="iid", rounds=3, local_steps=2, seed=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    simulate(SimulationConfig(**SMALL, out=root / "plain", target_accuracy=0.5))
    simulate(SimulationConfig(**SMALL, out=root / "int8", codec="int8", target_accuracy=0.5))
    return [load_run(root / "plain"), load_run(root / "int8")]


def assert_image(path, min_width=600):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= min_width and image.height >= 300


def test_labels_name_the_method_and_what_differs_and_the_title_what_is_shared(runs):
    labels, title = describe(runs)
    assert labels == ["dpsgd, ring, uncompressed, error-feedback none", "dpsgd, ring, codec int8, error-feedback choco"]
    assert title == "mnist1d, iid, 3 peers, 3 rounds x 2 local steps"


def test_the_reference_is_labelled_as_one_peer_on_all_the_data_not_by_the_algorithm_it_did_not_run(runs, tmp_path):
    simulate(SimulationConfig(**{**SMALL, "peers": 1}, out=tmp_path / "alone"))
    labels, _ = describe([runs[0], load_run(tmp_path / "alone")])
    assert labels == ["dpsgd, ring, uncompressed, 3 peers", "one peer on all the data (reference)"]


def test_runs_with_the_same_settings_are_told_apart_by_their_folder(runs):
    labels, _ = describe([runs[0], dataclasses.replace(runs[0], folder=runs[0].folder.with_name("again"))])
    assert labels[0].endswith("(plain)") and labels[1].endswith("(again)")


@pytest.mark.parametrize("x", ["round", "bytes", "time"])
def test_runs_are_overlaid_against_each_axis(runs, tmp_path, x):
    plot_runs(runs, tmp_path / f"{x}.png", x)
    assert_image(tmp_path / f"{x}.png", min_width=1200)  # accuracy beside consensus distance


def test_a_figure_can_be_a_pdf_but_not_an_unknown_format(runs, tmp_path):
    plot_runs(runs, tmp_path / "curves.pdf")
    assert (tmp_path / "curves.pdf").read_bytes().startswith(b"%PDF")
    with pytest.raises(ConfigError, match="use a .png, .pdf or .svg file"):
        plot_runs(runs, tmp_path / "curves.xyz")


def test_an_unwritable_destination_is_a_clear_error(runs, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot write .*file/curves.png"):
        plot_runs(runs, tmp_path / "file" / "curves.png")


@pytest.mark.parametrize(
    ("spec", "n", "directed", "edges"),
    [("ring", 8, False, 8), ("torus", 9, False, 18), ("star", 5, False, 4), ("exponential", 8, True, 24),
     ("onepeer-exponential", 8, True, 24), ("el-oracle:3", 8, True, 24), ("base:1", 8, False, 12)],
)
def test_the_drawn_graph_has_every_link_of_the_period(spec, n, directed, edges):
    graph = communication_graph(parse_topology(spec, n))
    assert graph.is_directed() == directed and graph.number_of_edges() == edges


@pytest.mark.parametrize("spec", ["ring", "torus", "star", "regular:3", "onepeer-exponential", "el-local:3", "base:2"])
def test_a_topology_is_drawn(tmp_path, spec):
    plot_topology(spec, 12, tmp_path / "graph.png")
    assert_image(tmp_path / "graph.png")


def test_peer_plot_overlays_runs_and_draws_topologies(runs, tmp_path, capsys):
    assert main(["plot", str(runs[0].folder), str(runs[1].folder), "--x", "bytes", "--out", str(tmp_path / "c.png")]) == 0
    assert_image(tmp_path / "c.png")
    assert main(["plot", "--topology", "torus", "--peers", "16", "--out", str(tmp_path / "t.png")]) == 0
    assert_image(tmp_path / "t.png")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "x.png"], "give one or more run folders"),
        (["RUN", "--topology", "ring", "--out", "x.png"], "not both"),
        (["--topology", "torus", "--peers", "7", "--out", "x.png"], "7 is prime"),
        (["--topology", "ring", "--peers", "1", "--out", "x.png"], "at least 2 peers"),
        (["nowhere", "--out", "x.png"], "nowhere is not a folder"),
    ],
)
def test_peer_plot_bad_input_is_one_line_and_exit_2(capsys, tmp_path, args, message):
    args = [str(tmp_path) if a == "RUN" else a for a in args]
    assert main(["plot", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_peer_plot_refuses_an_unknown_axis(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plot", "a", "--x", "epochs", "--out", "x.png"])
    assert exit_.value.code == 2 and "--x" in capsys.readouterr().err


def test_peer_plot_y_loss_writes_a_png_of_the_mean_test_loss(runs, tmp_path):
    assert main(["plot", str(runs[0].folder), str(runs[1].folder), "--y", "loss", "--out", str(tmp_path / "l.png")]) == 0
    assert_image(tmp_path / "l.png", min_width=1200)


def drawn(monkeypatch, runs, **options):
    """The figure that plot_runs draws, instead of writing it."""
    import peer.plot

    figures = []
    monkeypatch.setattr(peer.plot, "_save", lambda figure, out: figures.append(figure))
    plot_runs(runs, Path("unused.png"), **options)
    return figures[0].axes[0]


def test_the_loss_axis_shows_each_runs_mean_loss_and_the_loss_target_they_share(monkeypatch, tmp_path):
    simulate(SimulationConfig(**SMALL, out=tmp_path / "run", target_loss=1.5))
    run = load_run(tmp_path / "run")
    axis = drawn(monkeypatch, [run], y="loss")
    assert axis.get_ylabel() == "test loss (mean over peers; band: min to max)"
    curve, target = axis.lines
    assert list(curve.get_ydata()) == [point.mean_loss for point in run.points]
    assert list(target.get_ydata()) == [1.5, 1.5] and target.get_label() == "target 1.5"
    # On the accuracy axis a loss target has no line.
    assert len(drawn(monkeypatch, [run]).lines) == 1


def test_plotting_the_loss_of_metrics_without_loss_is_a_clear_error(runs, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(runs[0].folder, old)
    lines = [json.loads(line) for line in (old / "metrics.jsonl").read_text().splitlines()]
    (old / "metrics.jsonl").write_text("".join(json.dumps({**line, "loss": None}) + "\n" for line in lines))
    with pytest.raises(ConfigError, match="its metrics hold no test loss to plot; plot its accuracy"):
        plot_runs([load_run(old)], tmp_path / "l.png", y="loss")
    assert main(["plot", str(old), "--y", "loss", "--out", str(tmp_path / "l.png")]) == 2
    assert "no test loss" in capsys.readouterr().err
    plot_runs([load_run(old)], tmp_path / "a.png")  # its accuracy still plots
    assert_image(tmp_path / "a.png")
