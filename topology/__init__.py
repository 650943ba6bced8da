"""Graphs, mixing weights and round schedules for gossip between peers."""

from topology.graphs import TOPOLOGY_NAMES, TopologyError
from topology.schedule import Topology, parse_topology
from topology.weights import metropolis_hastings, spectral_gap, uniform

__all__ = [
    "TOPOLOGY_NAMES",
    "Topology",
    "TopologyError",
    "metropolis_hastings",
    "parse_topology",
    "spectral_gap",
    "uniform",
]
