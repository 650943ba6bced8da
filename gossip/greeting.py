"""Hello, welcome and goodbye between gossiping neighbours.

A newcomer says hello to its neighbours, who start gossiping with it, and starts from the model
and iteration of the first that answers; a peer that leaves says goodbye, and its neighbours
stop sending to it and waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from gossip.message import Message
from gossip.transport import PeerUnreachable
from gossip.validation import InvalidState, check_state

if TYPE_CHECKING:
    from gossip.protocols.base import ProtocolContext

log = logging.getLogger(__name__)

HELLO = "hello"  # a newcomer to its neighbours; answered with the neighbour's model and round
WELCOME = "welcome"
BYE = "bye"


class Greeting:
    def __init__(self, context: ProtocolContext, progress: Callable[[], int]):
        """``progress`` is the round (or iteration) this peer is at, which a newcomer starts from."""
        self.context = context
        self.progress = progress
        context.transport.serve(HELLO, self._on_hello)
        context.transport.serve(BYE, self._on_bye)

    async def join(self) -> int:
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
        return Message(WELCOME, self.context.transport.peer_id, self.progress(), self.context.learner.state())

    async def _on_bye(self, message: Message) -> None:
        self.context.neighbourhood.departed(message.sender)

    async def leave(self) -> None:
        transport, round_ = self.context.transport, self.progress()
        bye = Message(BYE, transport.peer_id, round_)
        neighbourhood = self.context.neighbourhood
        peers = sorted(peer for peer in neighbourhood.linked(round_) if not neighbourhood.pulls(peer))
        await asyncio.gather(*(transport.send(peer, bye) for peer in peers), return_exceptions=True)
