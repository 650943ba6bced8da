"""Training protocols: each one file, each a small subclass of ``Protocol``."""

from gossip.protocols.base import Protocol, ProtocolContext, RoundReport
from gossip.protocols.dpsgd import DPSGD
from gossip.protocols.fedavg import FedAvgClient, FedAvgServer

__all__ = ["DPSGD", "FedAvgClient", "FedAvgServer", "Protocol", "ProtocolContext", "RoundReport"]
