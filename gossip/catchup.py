"""Catch-up: a peer that joins a running swarm pulls a neighbour's current model and round
instead of starting from scratch (and instead of sending models the others would find late).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from gossip.learner import State
from gossip.message import Message, PeerId
from gossip.transport import PeerUnreachable, Transport
from gossip.validation import InvalidState, check_state

log = logging.getLogger(__name__)

PULL = "pull"
SNAPSHOT = "snapshot"


class SnapshotServer:
    """Answers pulls with the model as it was at the end of the latest round.

    A snapshot taken between rounds is consistent; reading the live model could catch it
    halfway through a training step. Only peers that ``admits`` (the swarm's members) get one.
    """

    def __init__(
        self, transport: Transport, state: State, round_: int = 0, *, admits: Callable[[PeerId], Awaitable[bool]]
    ):
        self.transport = transport
        self.admits = admits
        self.publish(state, round_)
        transport.serve(PULL, self._on_pull)

    def publish(self, state: State, round_: int) -> None:
        self._state, self._round = state, round_

    async def _on_pull(self, message: Message) -> Message | None:
        if not await self.admits(message.sender):
            self.transport.counters.reject("not-member")
            log.warning("%s: refused a snapshot to %s, which is not a member", self.transport.peer_id, message.sender)
            return None
        return Message(SNAPSHOT, self.transport.peer_id, self._round, self._state)


async def catch_up(
    transport: Transport, candidates: list[PeerId], reference: State, *, timeout: float
) -> tuple[State, int] | None:
    """The first valid snapshot among ``candidates`` (most advanced first), or None."""
    for peer in candidates:
        try:
            reply = await transport.request(peer, Message(PULL, transport.peer_id, 0), timeout=timeout)
            if reply.kind != SNAPSHOT:
                raise InvalidState(f"expected a {SNAPSHOT!r} reply, got {reply.kind!r}")
            check_state(reply.tensors, reference)
        except (TimeoutError, PeerUnreachable, InvalidState) as reason:
            log.warning("catch-up from %s failed: %r", peer, reason)
            continue
        return reply.tensors, reply.round
    return None
