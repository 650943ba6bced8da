"""Graphs, mixing weights and round schedules for gossip between peers.

- ``graphs.py``: graph generators on peers 0..n-1, parsed from a spec such as ``erdos:0.1``.
- ``weights.py``: mixing matrices (Metropolis-Hastings, uniform) and their spectral gap.
- ``drawn.py``: overlays drawn afresh every round (epidemic learning's ``el-oracle``, ``el-local``).
- ``base_graph.py``: Base-(k+1) graphs, exact consensus after a short period for any n.
- ``schedule.py``: the ``Topology`` object: who mixes with whom, with what weights, in each round.
- ``walk.py``: a token's random walk: the base chain, the self-repellent kernel and lazy visit counts.
"""

from topology.graphs import TOPOLOGY_NAMES, TopologyError, check_spec, is_drawn
from topology.schedule import Topology, parse_topology
from topology.walk import VisitCounts, base_chain, next_holder, srrw_probabilities, step_size
from topology.weights import metropolis_hastings, spectral_gap, uniform

__all__ = [
    "TOPOLOGY_NAMES",
    "Topology",
    "TopologyError",
    "VisitCounts",
    "base_chain",
    "check_spec",
    "is_drawn",
    "metropolis_hastings",
    "next_holder",
    "parse_topology",
    "spectral_gap",
    "srrw_probabilities",
    "step_size",
    "uniform",
]
