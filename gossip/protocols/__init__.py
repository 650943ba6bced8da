"""Training protocols: each one file, each a small subclass of ``Protocol``."""

from gossip.protocols.async_gossip import AsyncGossip
from gossip.protocols.base import Protocol, ProtocolContext, RoundReport
from gossip.protocols.dfedsam import DFedSAM
from gossip.protocols.dpsgd import DPSGD
from gossip.protocols.fedavg import FedAvgClient, FedAvgServer
from gossip.protocols.modest import MoDeST, ModestSettings
from gossip.protocols.srrw import SRRW, WalkSettings

# The protocols that gossip with a neighbourhood, by their command-line name.
GOSSIP_PROTOCOLS: dict[str, type[DPSGD]] = {"dpsgd": DPSGD, "dfedsam": DFedSAM}

__all__ = [
    "DPSGD", "GOSSIP_PROTOCOLS", "SRRW", "AsyncGossip", "DFedSAM", "FedAvgClient", "FedAvgServer", "MoDeST", "ModestSettings",
    "Protocol", "ProtocolContext", "RoundReport", "WalkSettings",
]
