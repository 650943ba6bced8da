"""The simulated world: many peers in one process, an emulated network and a virtual clock.

- ``loop.py``: an asyncio event loop whose clock jumps to the next timer instead of waiting.
- ``network.py``: the emulated network: each peer's uplink and downlink, latency, loss, partitions,
  collectives, and the simulated Transport.
- ``links.py``: ``--bandwidths``: each peer's link bandwidths, drawn from the seed; when a link is busy.
- ``clock.py``: the simulated Clock: virtual time, and training whose duration comes from a speed profile.
- ``speeds.py``: ``--speeds``: how fast each simulated peer computes, drawn from the seed.
- ``faults.py``: ``--faults``: peers that crash, leave or join, partitions, and crashes of a token's holder.
- ``byzantine.py``: ``--byzantine``: omniscient attackers that gossip crafted models.
- ``batched.py``: ``--engine batched``: many peers' local training as one vmapped step.
- ``averaging.py``: averaging in groups over the live peers of a round, charged as a ring all-reduce
  (dense codecs) or an all-gather (sparse ones) on the members' links.
- ``alone.py``: ``--peers 1``: the single-peer reference, one peer training alone on all the data.
"""

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
