"""FedAvg, the centralised reference: every round a server replaces all models by their exact average.

It needs a server that every peer reaches, which is what decentralised training avoids, so
it is offered in simulation only, to show the gap that each gossip method closes. The
average is uniform (not weighted by local data size): it is the consensus point that gossip
with doubly stochastic weights converges to, which makes the comparison like for like.
"""

from __future__ import annotations

import asyncio
import logging

from gossip.learner import State
from gossip.message import Message, PeerId
from gossip.mixing import average
from gossip.protocols.base import Protocol, ProtocolContext, RoundReport
from gossip.transport import Clock, PeerUnreachable, Transport
from gossip.validation import InvalidState, check_state

log = logging.getLogger(__name__)

UPDATE = "fedavg-update"
GLOBAL_MODEL = "fedavg-model"


class FedAvgServer:
    """Collects one model per peer per round and answers each with their average.

    A peer that has not reported within ``timeout`` of the round's first report is left out.
    """

    def __init__(self, transport: Transport, clock: Clock, reference: State, *, peers: int, timeout: float):
        self.transport = transport
        self.clock = clock
        self.peers = peers
        self.timeout = timeout
        self._reference = reference
        self._updates: dict[int, list[State]] = {}
        self._averages: dict[int, asyncio.Future[State]] = {}
        transport.serve(UPDATE, self._on_update)

    async def _on_update(self, message: Message) -> Message | None:
        try:
            check_state(message.tensors, self._reference)
        except InvalidState as reason:
            self.transport.counters.reject("invalid-model")
            log.warning("server: rejected update from %s: %s", message.sender, reason)
            return None
        round_ = message.round
        result = self._averages.setdefault(round_, asyncio.get_running_loop().create_future())
        updates = self._updates.setdefault(round_, [])
        if not result.done():
            updates.append(message.tensors)
            if len(updates) == self.peers:
                self._finish(round_)
        try:
            async with self.clock.timeout(self.timeout):
                state = await asyncio.shield(result)
        except TimeoutError:
            self._finish(round_)
            state = result.result()
        return Message(GLOBAL_MODEL, self.transport.peer_id, round_, state)

    def _finish(self, round_: int) -> None:
        result = self._averages[round_]
        if not result.done():
            result.set_result(average(self._updates.pop(round_)))


class FedAvgClient(Protocol):
    name = "fedavg"

    def __init__(self, context: ProtocolContext, *, server: PeerId, local_steps: int, round_timeout: float):
        super().__init__(context)
        self.server = server
        self.local_steps = local_steps
        self.round_timeout = round_timeout

    async def run(self, rounds: int, first_round: int = 0) -> None:
        learner, clock, transport = self.context.learner, self.context.clock, self.context.transport
        for round_ in range(first_round, rounds):
            loss = await clock.compute(learner.train, self.local_steps, steps=self.local_steps)
            update = Message(UPDATE, transport.peer_id, round_, learner.state())
            started = clock.now()
            try:
                reply = await transport.request(self.server, update, timeout=self.round_timeout)
                learner.load_state(reply.tensors)
                heard = 1
            except (TimeoutError, PeerUnreachable) as reason:
                # Without the server's average the peer keeps its own model for this round.
                log.warning("%s: no global model for round %d: %r", transport.peer_id, round_, reason)
                heard = 0
            await self.context.round_finished(RoundReport(
                round_, loss, 1, heard, exchange_seconds=clock.now() - started, local_steps=self.local_steps
            ))
