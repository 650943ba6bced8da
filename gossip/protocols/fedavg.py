"""FedAvg, the centralised reference: a server samples peers, they train, it averages.

Each round the server draws ``sample_size`` of its clients uniformly at random (all of them by
default), sends them the global model, and replaces it by the uniform average of the models
that come back within the timeout. It needs a server that every peer reaches, which is what
decentralised training avoids, so it is offered in simulation only, to show the gap that each
decentralised method closes. The average is uniform (not weighted by local data size): it is
the consensus point that gossip with doubly stochastic weights converges to, which makes the
comparison like for like. The server reports each round's global model.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random

from gossip.learner import State
from gossip.message import Message, PeerId
from gossip.protocols.base import Protocol, ProtocolContext, RoundReport
from gossip.robust import mix_screened
from gossip.transport import PeerUnreachable
from gossip.validation import InvalidState, check_state

log = logging.getLogger(__name__)

TRAIN = "fedavg-train"  # the global model, to a sampled client; answered with UPDATE
UPDATE = "fedavg-update"
HELLO, BYE = "fedavg-hello", "fedavg-bye"
FINISHED = "fedavg-finished"


class FedAvgServer(Protocol):
    name = "fedavg-server"

    def __init__(
        self,
        context: ProtocolContext,
        *,
        clients: list[PeerId],
        sample_size: int | None,
        local_steps: int,
        round_timeout: float,
        seed: int,
    ):
        super().__init__(context)
        self.clients = set(clients)
        self.sample_size = sample_size
        self.local_steps = local_steps
        self.round_timeout = round_timeout
        self.seed = seed
        self._reference = context.learner.state()
        context.transport.serve(HELLO, self._on_hello)
        context.transport.serve(BYE, self._on_bye)

    async def _on_hello(self, message: Message) -> None:
        self.clients.add(message.sender)

    async def _on_bye(self, message: Message) -> None:
        self.clients.discard(message.sender)

    def sample(self, round_: int) -> list[PeerId]:
        pool = sorted(self.clients)
        size = len(pool) if self.sample_size is None else min(self.sample_size, len(pool))
        return sorted(random.Random(f"{self.seed}:{round_}").sample(pool, size))

    async def run(self, rounds: int, first_round: int = 0) -> None:
        learner, clock = self.context.learner, self.context.clock
        for round_ in range(first_round, rounds):
            sampled = self.sample(round_)
            request = Message(TRAIN, self.context.transport.peer_id, round_, learner.state())
            started = clock.now()
            replies = await asyncio.gather(*(self._train(client, request) for client in sampled))
            updates = [reply for reply in replies if reply is not None]
            if updates:
                # Centred on the global model, which has no weight of its own: plain mixing is the uniform average.
                arrived = {client: (1.0, reply[0]) for client, reply in zip(sampled, replies) if reply is not None}
                global_model = learner.state()
                learner.load_state(mix_screened(self.context.gossip.mixing, self.context.transport, global_model, 0.0, arrived, round_))
            loss = sum(loss for _, loss in updates) / len(updates) if updates else math.nan
            await self.context.round_finished(RoundReport(
                round_, loss, len(sampled), len(updates), exchange_seconds=clock.now() - started, local_steps=self.local_steps
            ))
        done = Message(FINISHED, self.context.transport.peer_id, rounds)
        await asyncio.gather(*(self._tell(client, done) for client in sorted(self.clients)))

    async def _train(self, client: PeerId, request: Message) -> tuple[State, float] | None:
        transport = self.context.transport
        try:
            reply = await transport.request(client, request, timeout=self.round_timeout)
        except (TimeoutError, PeerUnreachable) as reason:
            log.info("server: no update from %s for round %d: %r", client, request.round, reason)
            return None
        loss = reply.meta.get("loss")
        try:
            if reply.kind != UPDATE or not isinstance(loss, float | int):
                raise InvalidState(f"expected an {UPDATE!r} with a loss, got {reply.kind!r}")
            check_state(reply.tensors, self._reference)
        except InvalidState as reason:
            transport.counters.reject("invalid-model")
            log.warning("server: rejected the update of %s: %s", client, reason)
            return None
        return reply.tensors, float(loss)

    async def _tell(self, client: PeerId, message: Message) -> None:
        try:
            async with self.context.clock.timeout(self.round_timeout):
                await self.context.transport.send(client, message)
        except (TimeoutError, PeerUnreachable):
            pass


class FedAvgClient(Protocol):
    name = "fedavg"

    def __init__(self, context: ProtocolContext, *, server: PeerId, local_steps: int, joining: bool = False):
        super().__init__(context)
        self.server = server
        self.local_steps = local_steps
        self.joining = joining
        self._finished = asyncio.Event()
        self._reference = context.learner.state()
        context.transport.serve(TRAIN, self._on_train)
        context.transport.serve(FINISHED, self._on_finished)

    async def run(self, rounds: int, first_round: int = 0) -> None:
        if self.joining:
            await self._tell_server(HELLO)
        await self._finished.wait()

    async def leave(self) -> None:
        await self._tell_server(BYE)
        self._finished.set()

    async def _tell_server(self, kind: str) -> None:
        try:
            await self.context.transport.send(self.server, Message(kind, self.context.transport.peer_id, 0))
        except PeerUnreachable as reason:
            log.warning("%s: could not reach the server: %r", self.context.transport.peer_id, reason)

    async def _on_finished(self, message: Message) -> None:
        if message.sender == self.server:
            self._finished.set()

    async def _on_train(self, message: Message) -> Message | None:
        if message.sender != self.server or self._finished.is_set():
            return None
        try:
            check_state(message.tensors, self._reference)
        except InvalidState as reason:
            self.context.transport.counters.reject("invalid-model")
            log.warning("%s: rejected the global model: %s", self.context.transport.peer_id, reason)
            return None
        learner = self.context.learner
        learner.load_state(message.tensors)
        # The learning-rate schedule follows the server's rounds, not how often this client was sampled.
        learner.set_progress(message.round * self.local_steps)
        loss = await self.context.clock.compute(learner.train, self.local_steps, steps=self.local_steps)
        return Message(UPDATE, self.context.transport.peer_id, message.round, learner.state(), meta={"loss": loss})
