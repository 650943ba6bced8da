"""Training protocols: each one file, each a small subclass of ``Protocol``.

- ``base.py``: the ``Protocol`` base class, what it tells the program running it, its context and round reports.
- ``registry.py``: protocols by ``--algorithm`` name (and ``module:Class`` for a user's own).
- ``dpsgd.py``: D-PSGD: K local steps, then one or more gossip steps with the neighbours.
- ``dfedsam.py``: DFedSAM and DFedSAM-MGS: sharpness-aware local steps, then Q gossip steps.
- ``modest.py``: MoDeST: each round a hash-chosen sample trains and a few aggregators average.
- ``srrw.py``: SRRW: self-repellent random-walk tokens carry the model from peer to peer.
- ``async_gossip.py``: asynchronous gossip: no rounds, staleness-weighted mixing, nobody waits.
- ``diloco.py``: DiLoCo and NoLoCo: H inner steps, then an outer step on combined pseudo-gradients.
- ``fedavg.py``: FedAvg, the centralised reference (simulation only): a server samples and averages.
"""

from gossip.protocols.async_gossip import AsyncGossip
from gossip.protocols.base import Protocol, ProtocolContext, RoundReport
from gossip.protocols.dfedsam import DFedSAM
from gossip.protocols.diloco import DiLoCo
from gossip.protocols.dpsgd import DPSGD
from gossip.protocols.fedavg import FedAvgClient, FedAvgServer
from gossip.protocols.modest import MoDeST, ModestSettings
from gossip.protocols.registry import build_protocol, names, protocol_named, register, registered, registered_as
from gossip.protocols.srrw import SRRW, WalkSettings

# The registry: a protocol is one file above and one line here.
for _protocol in (DPSGD, DFedSAM, MoDeST, FedAvgClient, SRRW, AsyncGossip, DiLoCo):
    register(_protocol)

__all__ = [
    "DPSGD", "SRRW", "AsyncGossip", "DFedSAM", "DiLoCo", "FedAvgClient", "FedAvgServer", "MoDeST", "ModestSettings", "Protocol",
    "ProtocolContext", "RoundReport", "WalkSettings", "build_protocol", "names", "protocol_named", "register",
    "registered", "registered_as",
]
