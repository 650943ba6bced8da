"""D-PSGD: K local SGD steps, then gossip with the neighbours (ALGORITHMS.md section 1).

A round may gossip Q times (``gossip_steps``), each a real exchange: gossip step q of round r
is step r * Q + q, so models of different rounds and steps never mix. A neighbour that missed
one step of a round is not waited for in the round's later steps (its model is mixed if it
has arrived), so a slow or dead neighbour costs a round one timeout, not Q.

A peer that joins says hello to its neighbours, who start gossiping with it, and starts from
the model and round of the first that answers; a peer that leaves says goodbye, and its
neighbours stop waiting for it.

Neighbours whose rounds drifted apart, however far (a partition, a long pause, a slow peer),
meet again: the one behind mixes the newer model it is sent and moves on to its round, while
the one ahead drops the older models as late until then. A jump goes to the round that at least
half of the neighbours have reached (so one lying neighbour among honest ones moves nobody),
never further than a round whose model was mixed, and never past the run: models claiming a
step beyond it are refused.
"""

from __future__ import annotations

import asyncio
import logging

from gossip.message import Message, PeerId
from gossip.protocols.base import Protocol, ProtocolContext, RoundReport
from gossip.transport import PeerUnreachable
from gossip.validation import InvalidState, check_state

log = logging.getLogger(__name__)

HELLO = "hello"  # a newcomer to its neighbours; answered with the neighbour's model and round
WELCOME = "welcome"
BYE = "bye"


class DPSGD(Protocol):
    name = "dpsgd"

    def __init__(self, context: ProtocolContext, *, local_steps: int, gossip_steps: int = 1, joining: bool = False):
        super().__init__(context)
        if gossip_steps < 1:
            raise ValueError(f"gossip steps must be at least 1, got {gossip_steps}")
        self.local_steps = local_steps
        self.gossip_steps = gossip_steps
        self.joining = joining
        self.exchange = context.exchange()
        self.round = 0
        context.transport.serve(HELLO, self._on_hello)
        context.transport.serve(BYE, self._on_bye)

    async def run(self, rounds: int, first_round: int = 0) -> None:
        learner, clock = self.context.learner, self.context.clock
        self.exchange.set_run_length(rounds * self.gossip_steps)
        round_ = first_round
        if self.joining:
            round_ = max(first_round, await self._join())
            learner.set_progress(round_ * self.local_steps)
        while round_ < rounds:
            self.round = round_
            loss = await clock.compute(learner.train, self.local_steps, steps=self.local_steps)
            state = learner.state()
            expected = heard = newest = 0
            absent: frozenset[PeerId] = frozenset()
            exchange_started = clock.now()
            for q in range(self.gossip_steps):
                result = await self.exchange.step(round_ * self.gossip_steps + q, state, absent)
                state = result.state
                absent |= result.missing
                expected += len(result.expected)
                heard += result.heard
                newest = max(newest, result.newest_step)
            learner.load_state(state)
            await self.context.round_finished(RoundReport(
                round_, loss, expected, heard, exchange_seconds=clock.now() - exchange_started, local_steps=self.local_steps
            ))
            # A peer that fell behind (slow, back from a pause, or cut off) has just mixed in its
            # neighbours' newer models; it goes on at their round, on their learning-rate
            # schedule, instead of sending models they would find late.
            next_round = max(round_ + 1, newest // self.gossip_steps)
            if next_round > round_ + 1:
                learner.set_progress(next_round * self.local_steps)
            round_ = next_round

    async def _join(self) -> int:
        """Say hello to the neighbours and take the first answer's model; the round to start at."""
        transport, neighbourhood = self.context.transport, self.context.neighbourhood
        hello = Message(HELLO, transport.peer_id, 0)
        reference = self.context.learner.state()
        for peer in sorted(neighbourhood.linked(0)):
            try:
                reply = await transport.request(peer, hello, timeout=self.context.gossip.timeout)
                if reply.kind != WELCOME:
                    raise InvalidState(f"expected a {WELCOME!r}, got {reply.kind!r}")
                check_state(reply.tensors, reference)
            except (TimeoutError, PeerUnreachable, InvalidState) as reason:
                log.info("%s: no welcome from %s: %r", transport.peer_id, peer, reason)
                continue
            neighbourhood.arrived(peer)
            self.context.learner.load_state(reply.tensors)
            return reply.round
        log.warning("%s: no neighbour answered our hello; starting alone from round 0", transport.peer_id)
        return 0

    async def _on_hello(self, message: Message) -> Message:
        self.context.neighbourhood.arrived(message.sender)
        return Message(WELCOME, self.context.transport.peer_id, self.round, self.context.learner.state())

    async def _on_bye(self, message: Message) -> None:
        self.context.neighbourhood.departed(message.sender)

    async def leave(self) -> None:
        transport = self.context.transport
        bye = Message(BYE, transport.peer_id, self.round)
        peers = sorted(self.context.neighbourhood.linked(self.round))
        await asyncio.gather(*(transport.send(peer, bye) for peer in peers), return_exceptions=True)
