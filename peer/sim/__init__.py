"""The simulated world: many peers in one process, an emulated network and a virtual clock."""

from peer.sim.clock import SimClock, SpeedProfile
from peer.sim.loop import SimulationDeadlock, VirtualTimeLoop
from peer.sim.network import LinkModel, SimNetwork, SimTransport

__all__ = [
    "LinkModel",
    "SimClock",
    "SimNetwork",
    "SimTransport",
    "SimulationDeadlock",
    "SpeedProfile",
    "VirtualTimeLoop",
]
