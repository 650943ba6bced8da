"""One gossip step with the neighbours: send our state, collect theirs, mix.

Shared by every protocol that mixes with a neighbourhood (D-PSGD, DFedSAM and its multiple
gossip steps). Each model carries its gossip step; a model for a step that has already been
mixed is late and dropped, and a neighbour that is ahead, however far, contributes its
freshest model (the protocol then moves on to that neighbour's round, so peers that drifted
apart meet again). A model for a step past the end of the run is malformed.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

from gossip.codecs import Codec, Identity
from gossip.learner import State
from gossip.message import Message, PeerId
from gossip.mixing import MixingRule, WeightedAverage
from gossip.model_codec import ModelMessages, exchanged
from gossip.neighbourhood import Neighbourhood
from gossip.robust import mix_screened
from gossip.transport import Clock, PeerUnreachable, Transport
from gossip.validation import InvalidState

log = logging.getLogger(__name__)

MODEL = "model"
MODEL_PULL = "model-pull"  # from a peer that accepts no connections: our model for a step, once we have it
PULL_RETRY = 0.5  # seconds between a puller's asks while the neighbour answers that it has nothing for it


@dataclass(frozen=True)
class StepResult:
    state: State
    expected: frozenset[PeerId]  # the in-neighbours of this step
    missing: frozenset[PeerId]  # of those, the ones whose model did not arrive in time
    newest_step: int  # the step at least half the in-neighbours have reached (see most_have_reached)
    sent: State | None = None  # what the neighbours decode of our model (kept by an exchange that mixes it)

    @property
    def heard(self) -> int:
        return len(self.expected) - len(self.missing)


def most_have_reached(step: int, reached: list[int], expected: int) -> int:
    """The step that at least half of the ``expected`` in-neighbours have reached, given the steps
    ``reached`` of those we heard from and counting the others as at ``step``: a peer far behind
    jumps there. A neighbour far ahead on its own (say, one that claims the last round to end our
    run) moves nobody who has another neighbour at our step, as long as fewer than half of the
    neighbours lie (what robust mixing assumes too).
    """
    steps = sorted(reached + [step] * (expected - len(reached)))
    return max(step, steps[len(steps) // 2]) if steps else step


class StepInbox:
    """The freshest model from each sender.

    A step is served by any model from a sender whose step is at least the one being
    mixed: a neighbour that is ahead is used as it is, however far ahead, instead of being
    waited for at a step it has already left. One model per sender is kept, for a bounded
    number of senders, so a hostile sender cannot make us buffer much; models for steps
    past ``end`` (the run's last step + 1, None while unknown) are refused.
    """

    def __init__(self, max_senders: int = 1024, end: int | None = None) -> None:
        self._latest: dict[PeerId, Message] = {}
        self._floor = 0  # steps below this are finished; their models are late
        self._max_senders = max_senders
        self.end = end
        self._arrived = asyncio.Event()

    def past_end(self, step: int) -> bool:
        """Whether the run has no such step: a model claiming it is malformed."""
        return self.end is not None and step >= self.end

    def put(self, message: Message) -> bool:
        """Keep a model if it is the sender's freshest; False when it is late, past the end of
        the run, or from one sender too many (identities are cheap to make, memory is not)."""
        if message.round < self._floor or self.past_end(message.round):
            return False
        current = self._latest.get(message.sender)
        if current is None and len(self._latest) >= self._max_senders:
            return False
        if current is None or message.round > current.round:
            self._latest[message.sender] = message
            self._arrived.set()
        return True

    def _fresh(self, sender: PeerId, step: int) -> bool:
        message = self._latest.get(sender)
        return message is not None and message.round >= step

    async def collect(
        self, step: int, expected: set[PeerId], clock: Clock, timeout: float, absent: frozenset[PeerId] = frozenset()
    ) -> dict[PeerId, Message]:
        """Wait until every expected sender but the absent ones has a model for ``step`` or later,
        or the timeout passes; return the fresh models of all expected senders."""
        awaited = expected - absent
        try:
            async with clock.timeout(timeout):
                while not all(self._fresh(sender, step) for sender in awaited):
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            pass
        fresh = {sender: self._latest[sender] for sender in expected if self._fresh(sender, step)}
        self._floor = step + 1
        for sender in [s for s, m in self._latest.items() if m.round <= step]:
            del self._latest[sender]
        return fresh


class Exchange(ABC):
    """One gossip step with the neighbours, as a protocol uses it."""

    _inbox: StepInbox

    def set_run_length(self, steps: int) -> None:
        """The run has gossip steps 0 .. ``steps - 1``: a model claiming a later step is refused as
        malformed, so that nobody can make us skip to a round past the run (or to its end, unless
        its model is one we mix)."""
        self._inbox.end = steps

    @abstractmethod
    async def step(self, step: int, state: State, absent: frozenset[PeerId] = frozenset()) -> StepResult:
        """Send our state, collect the neighbours' for this step, and return the mixed state.

        Neighbours in ``absent`` (they missed an earlier step of the round) are not waited
        for; their models are mixed if they are already there.
        """


def admitted(transport: Transport, neighbourhood: Neighbourhood, message: Message) -> bool:
    """Whether the sender may gossip with us at all; a refused message is counted and logged."""
    if neighbourhood.admits(message.sender):
        return True
    transport.counters.reject("incompatible")
    log.warning("%s: rejected a message from %s: it trains another task or model", transport.peer_id, message.sender)
    return False


def claims_past_end(transport: Transport, end: int | None, message: Message) -> bool:
    """Whether a message claims a step at or past ``end``, the end of the run (None: not known yet);
    such a claim is counted and logged."""
    if end is None or message.round < end:
        return False
    transport.counters.reject("malformed")
    log.warning(
        "%s: rejected a model from %s: it claims step %d, past the run's last step %d",
        transport.peer_id, message.sender, message.round, end - 1,
    )
    return True


def reject_model(transport: Transport, message: Message, reason: InvalidState) -> None:
    transport.counters.reject("invalid-model")
    log.warning("%s: rejected a model from %s at step %d: %s", transport.peer_id, message.sender, message.round, reason)


async def send_within(
    transport: Transport, clock: Clock, neighbourhood: Neighbourhood, peer: PeerId, message: Message, timeout: float
) -> None:
    """Send, giving up after ``timeout``: a neighbour that stops reading must not hold us up.
    A neighbour that could not be sent to is reported to the neighbourhood."""
    try:
        async with clock.timeout(timeout):
            await transport.send(peer, message)
    except (PeerUnreachable, TimeoutError) as reason:
        log.info("%s: could not send to %s: %s", transport.peer_id, peer, reason)
        neighbourhood.unreachable(peer)


def message_seed(*parts: object) -> int:
    """A seed both ends can name (random-k draws its indices from it), different per link and step."""
    return zlib.crc32(":".join(map(str, parts)).encode()) & 0x7FFFFFFF


class NeighbourExchange(Exchange):
    """Plain gossip: every neighbour gets our whole model, through ``codec`` when one is given.

    With a lossy codec and no error feedback, what the codec drops is lost for good; that is
    the baseline that :class:`gossip.choco.ChocoExchange` improves on. A receiver decodes with
    the codec the message names, so peers need not agree on one.

    A neighbour that accepts no connections (``Neighbourhood.pulls``) is not sent our model: it
    asks for it (MODEL_PULL), and is answered once we have one for its step or later, or with nothing
    when none comes within the timeout. Such a peer pulls from all its in-neighbours (the
    overlay gives it no neighbour of its own kind) and sends to its out-neighbours as usual.
    """

    def __init__(
        self,
        transport: Transport,
        clock: Clock,
        neighbourhood: Neighbourhood,
        reference: State,
        *,
        timeout: float,
        mixing: MixingRule | None = None,
        codec: Codec | None = None,
        mix_as_sent: bool = False,
    ):
        """With ``mix_as_sent`` our own model enters the mix as the neighbours decode it, and each
        step's result says what that was (``StepResult.sent``): every peer of a link then mixes the
        same two models, which error feedback on what a lossy codec dropped needs."""
        self.mix_as_sent = mix_as_sent
        self.transport = transport
        self.clock = clock
        self.neighbourhood = neighbourhood
        self.timeout = timeout
        self.mixing = mixing or WeightedAverage()
        self.models = ModelMessages(reference, codec or Identity())
        self._inbox = StepInbox()
        self._posted: Message | None = None  # our latest model, for neighbours that pull
        self._new_post = asyncio.Event()
        transport.serve(MODEL, self._receive)
        transport.serve(MODEL_PULL, self._on_pull)

    def _encode(self, step: int, state: State) -> Message:
        me = self.transport.peer_id
        tensors, meta, codec = self.models.encode(state, message_seed(me, step))
        return Message(MODEL, me, step, tensors, meta=meta, codec=codec)

    def _decode(self, message: Message) -> State:
        return self.models.decode(message.tensors, message.codec, message.meta)

    async def _receive(self, message: Message) -> None:
        if not admitted(self.transport, self.neighbourhood, message):
            return
        if claims_past_end(self.transport, self._inbox.end, message):
            return
        # Only peers we gossip with take a place in the inbox, so that strangers making up
        # identities cannot crowd the neighbours out (a view that lags ours catches up).
        if message.sender not in self.neighbourhood.linked(message.round):
            log.debug("%s: dropped a model from %s, not a neighbour", self.transport.peer_id, message.sender)
            return
        try:
            state = self._decode(message)
        except InvalidState as reason:
            reject_model(self.transport, message, reason)
            return
        if not self._inbox.put(replace(message, tensors=state)):
            # A neighbour far behind learns it is behind from our models, and catches up.
            log.debug("%s: dropped model from %s for step %d: late, or a sender too many", self.transport.peer_id, message.sender, message.round)

    async def _on_pull(self, message: Message) -> Message:
        """Our model for the puller's step or a later one; a message without tensors when there is
        none in time, or the puller is not a neighbour that must pull."""
        nothing = Message(MODEL_PULL, self.transport.peer_id, message.round)
        puller = message.sender
        if not self.neighbourhood.pulls(puller) or puller not in self.neighbourhood.linked(message.round):
            return nothing
        try:
            async with self.clock.timeout(self.timeout):
                while self._posted is None or self._posted.round < message.round:
                    self._new_post.clear()
                    await self._new_post.wait()
        except TimeoutError:
            return nothing
        return self._posted

    async def _pull(self, peer: PeerId, step: int) -> None:
        """Ask ``peer`` for its model of ``step``, again every PULL_RETRY seconds while it has nothing
        for us: it reads the members' records a moment after we do, so at first its view may not
        hold us yet."""
        ask = Message(MODEL_PULL, self.transport.peer_id, step)
        try:
            async with self.clock.timeout(self.timeout):
                reply = await self.transport.request(peer, ask, self.timeout)
                while reply.kind == MODEL_PULL and reply.sender == peer and not reply.tensors:
                    await self.clock.sleep(PULL_RETRY)
                    reply = await self.transport.request(peer, ask, self.timeout)
        except PeerUnreachable as reason:
            log.info("%s: could not pull from %s: %s", self.transport.peer_id, peer, reason)
            self.neighbourhood.unreachable(peer)
            return
        except TimeoutError:  # a slow neighbour, not a lost one: it is missing from this step only
            log.info("%s: no model from %s within the timeout", self.transport.peer_id, peer)
            return
        if reply.kind == MODEL and reply.sender == peer:
            await self._receive(reply)
        else:
            self.transport.counters.reject("malformed")
            log.warning("%s: %s answered a pull with a %r from %s", self.transport.peer_id, peer, reply.kind, reply.sender)

    async def step(self, step: int, state: State, absent: frozenset[PeerId] = frozenset()) -> StepResult:
        message = self._encode(step, state)
        self._posted = message
        self._new_post.set()
        await asyncio.gather(*(
            send_within(self.transport, self.clock, self.neighbourhood, peer, message, self.timeout)
            for peer in self.neighbourhood.out_neighbours(step)
            if not self.neighbourhood.pulls(peer)
        ))
        weights = self.neighbourhood.in_weights(step)
        pulls = []
        if self.neighbourhood.pulls(self.transport.peer_id):
            pulls = [asyncio.ensure_future(self._pull(peer, step)) for peer in sorted(weights)]
        try:
            received = await self._inbox.collect(step, set(weights), self.clock, self.timeout, absent)
        finally:
            for pull in pulls:
                pull.cancel()
        own = self._decode(message) if self.mix_as_sent else exchanged(state)
        mixed = mix_screened(
            self.mixing, self.transport, own, self.neighbourhood.self_weight(step),
            {peer: (weights[peer], received[peer].tensors) for peer in sorted(received)}, step,
        )
        expected = frozenset(weights)
        newest = most_have_reached(step, [m.round for m in received.values()], len(expected))
        sent = own if self.mix_as_sent else None
        return StepResult({**state, **mixed}, expected, expected - frozenset(received), newest, sent)
