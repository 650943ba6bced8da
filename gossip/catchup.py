"""Catch-up: a peer that joins a running swarm pulls a neighbour's current model and round
instead of starting from scratch (and instead of sending models the others would find late).
"""

from __future__ import annotations

import logging

from gossip.learner import State
from gossip.message import Message, PeerId
from gossip.robust import screen
from gossip.transport import PeerUnreachable, Transport
from gossip.validation import InvalidState, check_state

log = logging.getLogger(__name__)

PULL = "pull"
SNAPSHOT = "snapshot"


class SnapshotServer:
    """Answers pulls with the model as it was at the end of the latest round.

    A snapshot taken between rounds is consistent; reading the live model could catch it
    halfway through a training step. Only the swarm's members get one: the transport's admission
    drops a pull from anyone else before it reaches this server.
    """

    def __init__(self, transport: Transport, state: State, round_: int = 0):
        self.transport = transport
        self.publish(state, round_)
        transport.serve(PULL, self._on_pull)

    def publish(self, state: State, round_: int) -> None:
        self._state, self._round = state, round_

    async def _on_pull(self, message: Message) -> Message:
        return Message(SNAPSHOT, self.transport.peer_id, self._round, self._state)


async def catch_up(
    transport: Transport, candidates: list[PeerId], reference: State, *, timeout: float
) -> tuple[State, int] | None:
    """The first snapshot among ``candidates`` (most advanced first) that is valid and passes the
    outlier guard against ``reference``, our own model, or None. A valid model can still be absurd
    (1e30 in every weight), and a joiner would train on from it; one the guard refuses is counted
    as an ``outlier`` and the next candidate is asked."""
    for peer in candidates:
        try:
            reply = await transport.request(peer, Message(PULL, transport.peer_id, 0), timeout=timeout)
            if reply.kind != SNAPSHOT:
                raise InvalidState(f"expected a {SNAPSHOT!r} reply, got {reply.kind!r}")
            check_state(reply.tensors, reference)
        except (TimeoutError, PeerUnreachable, InvalidState) as reason:
            log.warning("catch-up from %s failed: %r", peer, reason)
            continue
        if screen(transport, reference, {peer: (1.0, reply.tensors)}, reply.round):
            return reply.tensors, reply.round
    return None
