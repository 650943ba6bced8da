"""How a protocol gossips (timeout, codec, error feedback, mixing rule, staleness), and the exchange that does it."""

from __future__ import annotations

from dataclasses import dataclass, field

from gossip.choco import ChocoExchange, parse_error_feedback
from gossip.codecs import Codec, Identity, parse_codec
from gossip.exchange import Exchange, NeighbourExchange
from gossip.learner import State
from gossip.mixing import MixingRule, WeightedAverage
from gossip.neighbourhood import Neighbourhood
from gossip.transport import Clock, Transport
from gossip.wait_free import Staleness, WaitFreeExchange


@dataclass(frozen=True)
class GossipSettings:
    timeout: float = 30.0  # seconds to wait for a neighbour's model
    codec: Codec = field(default_factory=Identity)  # a spec is parsed on the way in
    error_feedback: str = "none"  # none | choco | econtrol:ETA
    consensus_step: float = 1.0  # CHOCO's g; unused without error feedback
    mixing: MixingRule = field(default_factory=WeightedAverage)
    staleness: Staleness = field(default_factory=Staleness)  # gossip without rounds only

    def __post_init__(self) -> None:
        if isinstance(self.codec, str):
            object.__setattr__(self, "codec", parse_codec(self.codec))
        object.__setattr__(self, "_eta", parse_error_feedback(self.error_feedback))
        # Error feedback sends compressed differences and moves towards its copies of the
        # neighbours by a consensus step; a rule that rescales, clips or ranks whole models has
        # nothing to work on there.
        if self.error_feedback != "none" and type(self.mixing) is not WeightedAverage:
            raise ValueError(
                f"--mixing {self.mixing.spec} works on whole models, which error feedback does not send "
                "(it sends compressed differences); use it with --error-feedback none"
            )

    def exchange(self, transport: Transport, clock: Clock, neighbourhood: Neighbourhood, reference: State) -> Exchange:
        if self._eta is None:
            return NeighbourExchange(
                transport, clock, neighbourhood, reference, timeout=self.timeout, mixing=self.mixing, codec=self.codec
            )
        return ChocoExchange(
            transport, clock, neighbourhood, reference,
            timeout=self.timeout, codec=self.codec, consensus_step=self.consensus_step, eta=self._eta,
        )

    def wait_free_exchange(
        self, transport: Transport, clock: Clock, neighbourhood: Neighbourhood, reference: State
    ) -> WaitFreeExchange:
        if self.error_feedback != "none":
            raise ValueError(
                "gossip without rounds has no error feedback: it keeps per-link copies that both ends update "
                "at the same exchange; use --error-feedback none"
            )
        return WaitFreeExchange(
            transport, clock, neighbourhood, reference, timeout=self.timeout, staleness=self.staleness,
            mixing=self.mixing, codec=self.codec,
        )
