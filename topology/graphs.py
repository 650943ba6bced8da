"""Graph generators on peers 0..n-1, parsed from a topology spec such as ``erdos:0.1``."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import networkx as nx


class TopologyError(ValueError):
    """A topology spec that cannot give a usable graph; the message says what to change."""


ONE_PEER_EXPONENTIAL = "onepeer-exponential"

TOPOLOGY_NAMES = [
    "ring",
    "torus",
    "complete",
    "star",
    "regular:D",
    "erdos:P",
    "smallworld:K:P",
    "exponential",
    ONE_PEER_EXPONENTIAL,
    "base:K",
    "el-oracle:S",
    "el-local:S",
    "file:PATH",
]

# The graph changes from round to round: a period of graphs, or a fresh draw every round.
TIME_VARYING = (ONE_PEER_EXPONENTIAL, "base", "el-oracle", "el-local")
DRAWN = ("el-oracle", "el-local")  # a fresh draw every round: no link outlives its round


def is_drawn(spec: str) -> bool:
    """Whether ``spec`` draws its graph afresh every round."""
    return spec.strip().partition(":")[0] in DRAWN

_USAGE = {usage.partition(":")[0]: usage for usage in TOPOLOGY_NAMES}

# Only the random families and user files can come out disconnected.
_DISCONNECTED_HINTS = {
    "regular": "raise D or change --seed",
    "erdos": "raise P or change --seed",
    "smallworld": "raise K, lower P or change --seed",
    "file": "add edges so that every peer is reachable",
}


def split_spec(spec: str) -> tuple[str, list[str]]:
    """Split ``name:a:b`` into its name and parameters, checking both against TOPOLOGY_NAMES."""
    name, _, rest = spec.strip().partition(":")
    usage = _USAGE.get(name)
    if usage is None:
        raise TopologyError(f"unknown topology {name!r}; valid names: {', '.join(TOPOLOGY_NAMES)}")
    if name == "file":
        # A path may itself contain ':', so it is never split further.
        if not rest:
            raise TopologyError("topology 'file' needs a path: use file:PATH")
        return name, [rest]
    params = rest.split(":") if rest else []
    expected = usage.count(":")
    if len(params) != expected:
        raise TopologyError(
            f"topology {spec!r} has {len(params)} parameter(s) but {name} takes {expected}: "
            f"use {usage}"
        )
    return name, params


def check_spec(spec: str) -> None:
    """TopologyError when ``spec`` names no topology at any number of peers: an unknown name, a
    parameter that is not a number or is out of its range, an edge list that cannot be read.
    What depends on the number of peers (a torus of a prime number) is checked when the graph is
    built."""
    name, params = split_spec(spec)
    match name:
        case "regular":
            _at_least(spec, "D", _int_param(spec, "D", params[0]), 1)
        case "erdos":
            if not 0 < _float_param(spec, "P", params[0]) <= 1:
                raise TopologyError(f"topology {spec!r}: P must be in (0, 1]")
        case "smallworld":
            k = _int_param(spec, "K", params[0])
            if k < 2 or k % 2:
                raise TopologyError(f"topology {spec!r}: K must be even and at least 2")
            if not 0 <= _float_param(spec, "P", params[1]) <= 1:
                raise TopologyError(f"topology {spec!r}: P must be in [0, 1]")
        case "base" | "el-oracle" | "el-local":
            positive_int_param(spec, params[0])
        case "file":
            try:
                Path(params[0]).read_text()
            except (OSError, UnicodeDecodeError) as error:
                raise TopologyError(f"cannot read edge list {params[0]}: {error}") from None


def _at_least(spec: str, label: str, value: int, least: int) -> None:
    if value < least:
        raise TopologyError(f"topology {spec!r}: {label} must be at least {least}, got {value}")


def build_graph(spec: str, n: int, seed: int = 0) -> nx.Graph:
    """The static graph ``spec`` names on n peers; connected (strongly, if directed) or an error."""
    if n < 2:
        raise TopologyError(f"topology {spec!r} needs at least 2 peers, got {n}")
    name, params = split_spec(spec)
    graph = _build(name, params, spec, n, seed)
    connected = nx.is_strongly_connected(graph) if graph.is_directed() else nx.is_connected(graph)
    if not connected:
        hint = _DISCONNECTED_HINTS.get(name, "choose another topology")
        raise TopologyError(f"{spec} with {n} peers gave a disconnected graph; {hint}")
    return graph


def _build(name: str, params: list[str], spec: str, n: int, seed: int) -> nx.Graph:
    match name:
        case "ring":
            return ring(n)
        case "torus":
            return torus(n)
        case "complete":
            return complete(n)
        case "star":
            return star(n)
        case "regular":
            return random_regular(n, _int_param(spec, "D", params[0]), seed)
        case "erdos":
            return erdos_renyi(n, _float_param(spec, "P", params[0]), seed)
        case "smallworld":
            k = _int_param(spec, "K", params[0])
            return small_world(n, k, _float_param(spec, "P", params[1]), seed)
        case "exponential":
            return exponential(n)
        case "file":
            return read_edge_list(params[0], n)
        case _:
            raise TopologyError(
                f"topology {name!r} is time-varying and has no single graph; use parse_topology"
            )


def _int_param(spec: str, label: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        message = f"topology {spec!r}: {label} must be an integer, got {text!r}"
        raise TopologyError(message) from None


def positive_int_param(spec: str, text: str) -> int:
    """The one integer parameter of ``base:K``, ``el-oracle:S`` or ``el-local:S``, at least 1."""
    name, _, _ = spec.partition(":")
    label = "K" if name == "base" else "S"
    value = _int_param(spec, label, text)
    _at_least(spec, label, value, 1)
    return value


def _float_param(spec: str, label: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise TopologyError(f"topology {spec!r}: {label} must be a number, got {text!r}") from None


def ring(n: int) -> nx.Graph:
    """Cycle 0-1-...-(n-1)-0."""
    return nx.cycle_graph(n)


def torus(n: int) -> nx.Graph:
    """2-D torus of r x c peers, r <= c as close as possible, both >= 3 so every degree is 4."""
    shape = torus_shape(n)
    if shape is None:
        reason = f"{n} is prime" if _is_prime(n) else f"{n} is not r x c with r, c >= 3"
        suggestion = next(
            m for step in itertools.count(1) for m in (n - step, n + step) if torus_shape(m)
        )
        raise TopologyError(
            f"torus with {n} peers: {reason}; use ring, or a torus of {suggestion} peers"
        )
    rows, cols = shape
    grid = nx.grid_2d_graph(rows, cols, periodic=True)
    # Sorted (row, col) labels become row * cols + col.
    return nx.convert_node_labels_to_integers(grid, ordering="sorted")


def torus_shape(n: int) -> tuple[int, int] | None:
    # The suggestion search in torus() may probe n <= 0.
    for rows in range(math.isqrt(max(n, 0)), 2, -1):
        if n % rows == 0:
            return rows, n // rows
    return None


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, math.isqrt(n) + 1))


def complete(n: int) -> nx.Graph:
    """Every pair of peers linked."""
    return nx.complete_graph(n)


def star(n: int) -> nx.Graph:
    """Peer 0 is the hub, linked to every other peer."""
    return nx.star_graph(n - 1)


def random_regular(n: int, degree: int, seed: int) -> nx.Graph:
    """Uniformly random degree-regular graph."""
    if not 1 <= degree < n:
        raise TopologyError(f"regular:{degree} with {n} peers: D must be in 1..{n - 1}")
    if n * degree % 2:
        raise TopologyError(
            f"regular:{degree} with {n} peers: n * D must be even; change D or the number of peers"
        )
    return nx.random_regular_graph(degree, n, seed=seed)


def erdos_renyi(n: int, p: float, seed: int) -> nx.Graph:
    """G(n, p): each pair linked independently with probability p."""
    if not 0 < p <= 1:
        raise TopologyError(f"erdos:{p} with {n} peers: P must be in (0, 1]")
    return nx.gnp_random_graph(n, p, seed=seed)


def small_world(n: int, k: int, p: float, seed: int) -> nx.Graph:
    """Watts-Strogatz: ring lattice of k nearest neighbours, edges rewired with probability p."""
    # networkx silently drops an odd k to k - 1, so insist on an even one.
    if k < 2 or k % 2 or k >= n:
        raise TopologyError(
            f"smallworld:{k}:{p} with {n} peers: K must be even and in 2..{n - 1}"
        )
    # P = 0 is the plain ring lattice, a legitimate choice here.
    if not 0 <= p <= 1:
        raise TopologyError(f"smallworld:{k}:{p} with {n} peers: P must be in [0, 1]")
    return nx.watts_strogatz_graph(n, k, p, seed=seed)


def exponential(n: int) -> nx.DiGraph:
    """Static exponential graph: i -> (i + 2^k) mod n for k = 0..floor(log2(n - 1))."""
    graph = nx.DiGraph()
    graph.add_nodes_from(range(n))
    # bit_length avoids float rounding in log2 for large n.
    hops = [2**k for k in range((n - 1).bit_length())]
    graph.add_edges_from((i, (i + hop) % n) for i in range(n) for hop in hops)
    return graph


def read_edge_list(path: str, n: int) -> nx.Graph:
    """Undirected graph from lines ``u v``; '#' starts a comment; ids must be exactly 0..n-1."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise TopologyError(f"cannot read edge list {path}: {error}") from None
    graph = nx.Graph()
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.partition("#")[0].split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) != 2:
            raise TopologyError(f"{where}: expected two node ids 'u v', got {line.strip()!r}")
        try:
            u, v = int(fields[0]), int(fields[1])
        except ValueError:
            message = f"{where}: node ids must be integers, got {line.strip()!r}"
            raise TopologyError(message) from None
        for node in (u, v):
            if not 0 <= node < n:
                raise TopologyError(f"{where}: node id {node} is outside 0..{n - 1} ({n} peers)")
        if u == v:
            raise TopologyError(f"{where}: self-loop on node {u}")
        graph.add_edge(u, v)
    missing = sorted(set(range(n)) - set(graph.nodes))
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise TopologyError(
            f"{path}: node ids must be exactly 0..{n - 1} ({n} peers) but {shown} never appear"
        )
    return graph
