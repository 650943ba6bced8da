"""Figures: runs' learning curves side by side, and a topology with its spectral gap.

Drawn on matplotlib Figure objects and written straight to a file: no pyplot state and no
display are involved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import networkx as nx
import numpy as np
from matplotlib.figure import Figure

from peer.curve import METRICS, X_AXES, CurvePoint
from peer.errors import ConfigError
from peer.runs import Run
from topology import Topology, parse_topology
from topology.graphs import split_spec, torus_shape

# Every label names these; the settings below join it when they differ between the runs shown.
NAMED = ("algorithm", "topology", "codec")
SETTINGS = (
    "task", "partition", "peers", "rounds", "local_steps", "batch_size", "lr", "lr_schedule", "init", "mixing",
    "gossip_steps", "sam_rho", "error_feedback", "consensus_step", "sample_size", "aggregators", "success_fraction",
    "mix_point", "speeds", "bandwidths", "fragments", "overlap", "staleness", "duration", "faults", "byzantine", "seed",
)
DPI = 150


def _setting(key: str, value: Any) -> str:
    if key == "codec":
        return "uncompressed" if value == "none" else f"codec {value}"
    if key in ("algorithm", "topology", "task", "partition"):
        return str(value)
    if key == "peers":
        return f"{value} peers"
    return f"{key.replace('_', '-')} {value}"


def describe(runs: list[Run]) -> tuple[list[str], str]:
    """A legend label per run (what it is and how it differs from the others), and a title with
    the settings they all share."""
    summaries = [run.summary for run in runs]
    differing = [k for k in SETTINGS if len({repr(s.get(k)) for s in summaries}) > 1]
    labels = []
    for run in runs:
        # The reference trained alone: no algorithm, topology or codec of its own to name.
        named = () if run.summary.get("reference") else NAMED
        parts = [_setting(k, run.summary[k]) for k in (*named, *differing) if run.summary.get(k) is not None]
        if run.summary.get("reference"):
            parts = ["one peer on all the data (reference)", *(p for p in parts if not p.endswith(" peers"))]
        labels.append(", ".join(parts) or run.folder.name)
    if len(set(labels)) < len(labels):  # the same settings twice: the folders tell them apart
        labels = [f"{label} ({run.folder.name})" for label, run in zip(labels, runs)]
    first = summaries[0]
    shared = [
        _setting(k, first[k]) for k in ("task", "partition", "peers") if k not in differing and first.get(k) is not None
    ]
    if "rounds" not in differing and "local_steps" not in differing and first.get("local_steps"):
        shared.append(f"{first['rounds']} rounds x {first['local_steps']} local steps")
    return labels, ", ".join(shared)


def _x(points: list[CurvePoint], axis: str) -> np.ndarray:
    if axis == "round":
        return np.array([p.round + 1 for p in points])
    if axis == "bytes":
        return np.array([p.bytes_sent / 1e6 for p in points])
    return np.array([p.seconds for p in points])


def _x_label(axis: str, runs: list[Run]) -> str:
    if axis == "round":
        return "round"
    if axis == "bytes":
        return "bytes sent by all peers (MB)"
    clocks = {run.wall_clock for run in runs}
    return "time (s)" if len(clocks) > 1 else ("wall-clock time (s)" if clocks.pop() else "simulated time (s)")


def _check_plottable(runs: list[Run], x: str, y: str) -> None:
    if x not in X_AXES:
        raise ConfigError(f"--x {x!r}: choose one of {', '.join(X_AXES)}")
    if y not in METRICS:
        raise ConfigError(f"--y {y!r}: choose one of {', '.join(METRICS)}")
    for run in runs:
        if not run.points:
            raise ConfigError(f"{run.folder} has no evaluated round yet; plot it once a round has been evaluated")
        if y == "loss" and any(point.mean_loss is None for point in run.points):
            raise ConfigError(f"{run.folder}: its metrics hold no test loss to plot; plot its accuracy (--y accuracy)")


def plot_runs(runs: list[Run], out: Path, x: str = "round", *, y: str = "accuracy", log_x: bool = False) -> None:
    """Mean test accuracy (``y``: or loss) with its min-max band across peers, one curve per run,
    and the runs' target where they share one; beside it the consensus distance for the runs that
    recorded it. ``log_x``: a logarithmic x axis, for runs whose bytes or time differ by orders of
    magnitude."""
    _check_plottable(runs, x, y)
    labels, title = describe(runs)
    with_consensus = [run for run in runs if any(distance > 0 for _, distance in run.consensus)]
    columns = 2 if with_consensus else 1
    figure = Figure(figsize=(6.4 * columns, 4.4), layout="constrained")
    axes = figure.subplots(1, columns, squeeze=False)
    metric_axis = axes[0][0]
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (run, label) in enumerate(zip(runs, labels)):
        colour = colours[index % len(colours)]
        xs = _x(run.points, x)
        metric_axis.plot(xs, [getattr(p, f"mean_{y}") for p in run.points], color=colour, linewidth=1.6, label=label)
        if any(p.peers > 1 for p in run.points):
            metric_axis.fill_between(
                xs, [getattr(p, f"min_{y}") for p in run.points], [getattr(p, f"max_{y}") for p in run.points],
                color=colour, alpha=0.18, linewidth=0,
            )
    targets = {run.summary.get(f"target_{y}") for run in runs}
    if len(targets) == 1 and (target := targets.pop()) is not None:
        metric_axis.axhline(target, color="0.4", linestyle=":", linewidth=1, label=f"target {target:g}")
    metric_axis.set_xlabel(_x_label(x, runs))
    metric_axis.set_ylabel(f"test {y} (mean over peers; band: min to max)")
    if y == "accuracy":
        metric_axis.set_ylim(top=1.0)
    metric_axis.legend(loc="upper right" if METRICS[y] else "lower right", fontsize="small", frameon=False)
    if with_consensus:
        consensus_axis = axes[0][1]
        for index, run in enumerate(runs):
            if run not in with_consensus:
                continue
            by_round = {p.round: p for p in run.points}
            kept = [(by_round[r], d) for r, d in run.consensus if r in by_round and d > 0]
            consensus_axis.plot(
                _x([p for p, _ in kept], x), [d for _, d in kept],
                color=colours[index % len(colours)], linewidth=1.6, label=labels[index],
            )
        consensus_axis.set_yscale("log")
        consensus_axis.set_xlabel(_x_label(x, runs))
        consensus_axis.set_ylabel(r"consensus distance $\frac{1}{n}\sum_i \|x_i - \bar{x}\|^2$")
        if len(with_consensus) < len(runs):
            consensus_axis.set_title("runs that record it (exact averaging gives 0)", fontsize="small")
    for axis in axes[0]:
        if log_x:
            axis.set_xscale("log")
        axis.grid(alpha=0.3)
        axis.spines[["top", "right"]].set_visible(False)
    if title:
        figure.suptitle(title, fontsize="medium")
    _save(figure, out)


def plot_topology(spec: str, peers: int, out: Path, *, weights: str = "metropolis", seed: int = 0) -> None:
    """The graph that ``spec`` gives on ``peers`` peers (for a time-varying one, every link of its
    period; for a drawn one, round 0's draw), with the spectral gap of its mixing matrix in the title."""
    topology = parse_topology(spec, peers, weights=weights, seed=seed)
    graph = communication_graph(topology)
    directed = graph.is_directed()
    figure = Figure(figsize=(6.4, 6.4), layout="constrained")
    axis = figure.subplots()
    name, _ = split_spec(spec)
    positions = _layout(name, graph, seed)
    node_size = 300 if peers <= 32 else 40
    nx.draw_networkx_nodes(graph, positions, ax=axis, node_size=node_size, node_color="#4c72b0")
    if peers <= 32:
        nx.draw_networkx_labels(graph, positions, ax=axis, font_color="white", font_size=8)
    # On a grid, a torus's wrap-around links would lie on top of the row or column they close,
    # so they are drawn as arcs.
    far = {(a, b) for a, b in graph.edges if np.abs(positions[a] - positions[b]).sum() > 1.5} if name == "torus" else set()
    for edges, shape in ((set(graph.edges) - far, "arc3"), (far, "arc3,rad=0.35")):
        nx.draw_networkx_edges(
            graph, positions, edgelist=sorted(edges), ax=axis, node_size=node_size, edge_color="0.55", width=0.8,
            arrows=True, arrowstyle="-|>" if directed else "-", arrowsize=8, connectionstyle=shape,
        )
    axis.set_axis_off()
    title = f"{spec}, {peers} peers: spectral gap {topology.spectral_gap():.4f}"
    if topology.drawn:
        degrees = topology.in_degrees(1)
        title += f"\n(round 0's draw: in-degrees {min(degrees)} to {max(degrees)}; the gap is in expectation over draws)"
    elif topology.time_varying:
        title += f"\n(all links of its {topology.period}-round period; the gap is of one period's product)"
    axis.set_title(title, fontsize="medium")
    _save(figure, out)


def communication_graph(topology: Topology) -> nx.Graph:
    """Who sends to whom over a whole period (a drawn topology: in round 0): j -> i wherever
    some W(t)[i, j] > 0; undirected when every link goes both ways."""
    links = {
        (int(j), int(i))
        for phase in range(topology.period or 1)
        for i, j in zip(*np.nonzero(topology.mixing_matrix(phase)))
        if i != j
    }
    graph = nx.Graph() if all((b, a) in links for a, b in links) else nx.DiGraph()
    graph.add_nodes_from(range(topology.n))
    graph.add_edges_from(links)
    return graph


def _layout(name: str, graph: nx.Graph, seed: int) -> dict[int, np.ndarray]:
    n = graph.number_of_nodes()
    if name == "torus":
        _, columns = torus_shape(n)
        return {i: np.array([i % columns, -(i // columns)], dtype=float) for i in range(n)}
    if name == "star":
        return nx.shell_layout(graph, [[0], list(range(1, n))])
    if name in ("regular", "erdos", "file"):
        return nx.spring_layout(graph, seed=seed)
    return nx.circular_layout(graph)


def _save(figure: Figure, out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=DPI)
    except OSError as error:
        raise ConfigError(f"cannot write {out} ({error.strerror or error}); choose a writable --out") from None
    except ValueError as error:  # an extension matplotlib has no writer for
        raise ConfigError(f"cannot write {out}: {error}; use a .png, .pdf or .svg file") from None
