"""Gossip without rounds (docs/algorithms.md#asynchronous-gossip): send each model as soon as it is trained,
without waiting for anyone, and mix the newest model held from each neighbour.

Every model carries a stamp: its sender's iteration, kept as a logical clock. A peer counts its
own iterations and, when it mixes, moves on to the iteration most of its neighbours have reached,
so a slow peer's clock keeps up with a fast swarm's and a stamp says how current a model's
information is, not how much work its sender has done. A model's staleness at a mix is how many
iterations its stamp is behind ours; its weight is its sender's weight on the graph times
(1 + staleness)^-exponent, and the weights are renormalised over what is mixed. A model more
than ``bound`` iterations behind is not mixed: a neighbour that died fades out, then drops out.

Nothing here waits. Each out-neighbour has a one-model outbox that the newest model replaces
and a task that drains it, so a slow link delays only its own next model; a mix takes what is
in the cache at that moment, the last model cached from a neighbour when nothing new came.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass

from gossip.codecs import Codec, Identity
from gossip.exchange import admitted, claims_past_end, message_seed, most_have_reached, reject_model, send_within
from gossip.learner import State
from gossip.message import Message, PeerId
from gossip.mixing import MixingRule, WeightedAverage
from gossip.model_codec import ModelMessages, exchanged
from gossip.neighbourhood import Neighbourhood
from gossip.robust import screen
from gossip.transport import Clock, Transport
from gossip.validation import InvalidState

log = logging.getLogger(__name__)

MODEL = "async-model"
SPEED = "speed"  # meta key: the fastest speed, in local steps per second, its sender knows of
MAX_SENDERS = 1024  # models cached at most; only neighbours take a place
STALENESS_HELP = "constant (every cached model counts fully) or poly:A (weight (1 + staleness)^-A, A >= 0)"


@dataclass(frozen=True)
class Staleness:
    exponent: float = 0.5  # weight (1 + tau)^-exponent; 0: a cached model counts as much as a fresh one
    bound: int = 32  # iterations: a model further behind is not mixed

    def __post_init__(self) -> None:
        if not (math.isfinite(self.exponent) and self.exponent >= 0):
            raise ValueError(f"the staleness exponent must be >= 0, got {self.exponent}")
        if self.bound < 0:
            raise ValueError(f"the staleness bound must be >= 0 iterations, got {self.bound}")

    def weight(self, staleness: int) -> float:
        return 0.0 if staleness > self.bound else (1.0 + staleness) ** -self.exponent


def parse_staleness(spec: str) -> float:
    """The exponent a --staleness spec names; ValueError with the valid forms."""
    if spec == "constant":
        return 0.0
    name, _, value = spec.partition(":")
    if name == "poly":
        try:
            exponent = float(value)
        except ValueError:
            exponent = math.nan
        if math.isfinite(exponent) and exponent >= 0:
            return exponent
        raise ValueError(f"--staleness {spec[:60]!r}: the exponent A of poly:A must be a number >= 0")
    raise ValueError(f"unknown --staleness {spec[:60]!r}; valid: {STALENESS_HELP}")


@dataclass
class Cached:
    stamp: int
    state: State
    speed: float | None
    fresh: bool = True  # arrived since the last mix


@dataclass(frozen=True)
class MixResult:
    state: State
    expected: int  # in-neighbours at this mix
    heard: int  # of those, the ones whose newest model arrived since the last mix
    mixed: int  # neighbours' models mixed, fresh or cached, within the staleness bound
    stalest: int  # the largest staleness mixed (0 when none was)
    reached: int  # the iteration at least half of the in-neighbours have reached
    fastest: float | None  # the fastest speed the in-neighbours know of (None: none said)


class WaitFreeExchange:
    def __init__(
        self,
        transport: Transport,
        clock: Clock,
        neighbourhood: Neighbourhood,
        reference: State,
        *,
        timeout: float,
        staleness: Staleness,
        mixing: MixingRule | None = None,
        codec: Codec | None = None,
    ):
        self.transport = transport
        self.clock = clock
        self.neighbourhood = neighbourhood
        self.timeout = timeout
        self.staleness = staleness
        self.mixing = mixing or WeightedAverage()
        self.models = ModelMessages(reference, codec or Identity())
        self.end: int | None = None  # the run's iterations: a stamp at or past it is refused
        self._cache: dict[PeerId, Cached] = {}
        self._outbox: dict[PeerId, Message] = {}
        self._senders: dict[PeerId, asyncio.Task] = {}
        transport.serve(MODEL, self._receive)

    def set_run_length(self, iterations: int) -> None:
        self.end = iterations

    def publish(self, stamp: int, state: State, speed: float | None) -> None:
        """Hand our model to every out-neighbour's outbox; returns at once."""
        me = self.transport.peer_id
        tensors, meta, codec = self.models.encode(state, message_seed(me, stamp))
        if speed is not None:
            meta = {**meta, SPEED: speed}
        message = Message(MODEL, me, stamp, tensors, meta=meta, codec=codec)
        for peer in self.neighbourhood.out_neighbours(stamp):
            self._outbox[peer] = message  # an older model still waiting there is not worth sending
            if peer not in self._senders:
                self._senders[peer] = asyncio.get_running_loop().create_task(self._drain(peer))

    async def _drain(self, peer: PeerId) -> None:
        try:
            while (message := self._outbox.pop(peer, None)) is not None:
                await send_within(self.transport, self.clock, self.neighbourhood, peer, message, self.timeout)
        finally:
            del self._senders[peer]

    async def flush(self) -> None:
        """Wait until the models in the outboxes are sent (or given up on after the timeout)."""
        while self._senders:
            await asyncio.wait(list(self._senders.values()))

    def close(self) -> None:
        """Stop sending: what is still in an outbox is dropped."""
        self._outbox.clear()
        for task in list(self._senders.values()):
            task.cancel()

    async def _receive(self, message: Message) -> None:
        if not admitted(self.transport, self.neighbourhood, message) or claims_past_end(self.transport, self.end, message):
            return
        sender = message.sender
        if sender not in self.neighbourhood.linked(message.round):
            log.debug("%s: dropped a model from %s, not a neighbour", self.transport.peer_id, sender)
            return
        cached = self._cache.get(sender)
        if cached is not None and message.round <= cached.stamp:
            return  # overtaken on the way by a newer one
        if cached is None and len(self._cache) >= MAX_SENDERS:
            return
        speed = message.meta.get(SPEED)
        try:
            if speed is not None and not (type(speed) in (int, float) and math.isfinite(speed) and speed > 0):
                raise InvalidState(f"its speed {speed!r} is not a number of steps per second > 0")
            state = self.models.decode(message.tensors, message.codec, message.meta)
        except InvalidState as reason:
            reject_model(self.transport, message, reason)
            return
        self._cache[sender] = Cached(message.round, state, None if speed is None else float(speed))

    def mix(self, stamp: int, state: State) -> MixResult:
        """Our model (of iteration ``stamp``) mixed with the newest model cached from each in-neighbour."""
        weights = self.neighbourhood.in_weights(stamp)
        candidates: dict[PeerId, tuple[float, State]] = {}
        staleness: dict[PeerId, int] = {}
        heard = 0
        for peer in sorted(weights):
            cached = self._cache.get(peer)
            if cached is None:
                continue
            heard += cached.fresh
            cached.fresh = False
            staleness[peer] = max(0, stamp - cached.stamp)
            discount = self.staleness.weight(staleness[peer])
            if discount > 0:
                candidates[peer] = (weights[peer] * discount, cached.state)
        own = exchanged(state)
        kept = screen(self.transport, own, candidates, stamp)
        for peer in candidates.keys() - kept.keys():
            del self._cache[peer]  # refused once, not mixed again
        mixed = self.mixing.mix(own, self.neighbourhood.self_weight(stamp), list(kept.values()))
        known = [self._cache[peer] for peer in weights if peer in self._cache]
        speeds = [cached.speed for cached in known if cached.speed is not None]
        return MixResult(
            {**state, **mixed}, len(weights), heard, len(kept), max((staleness[p] for p in kept), default=0),
            most_have_reached(stamp, [cached.stamp for cached in known], len(weights)), max(speeds, default=None),
        )
