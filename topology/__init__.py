"""Graphs, mixing weights and round schedules for gossip between peers."""

from topology.graphs import TOPOLOGY_NAMES, TopologyError
from topology.schedule import Topology, parse_topology
from topology.walk import VisitCounts, base_chain, next_holder, srrw_probabilities, step_size
from topology.weights import metropolis_hastings, spectral_gap, uniform

__all__ = [
    "TOPOLOGY_NAMES",
    "Topology",
    "TopologyError",
    "VisitCounts",
    "base_chain",
    "metropolis_hastings",
    "next_holder",
    "parse_topology",
    "spectral_gap",
    "srrw_probabilities",
    "step_size",
    "uniform",
]
