"""FedAvg, the centralised reference: a server samples peers, they train, it averages.

Each round the server draws ``sample_size`` of its clients uniformly at random (all of them by
default), sends them the global model, and replaces it by the uniform average of the models
that come back within the timeout. It needs a server that every peer reaches, which is what
decentralised training avoids, so it is offered in simulation only, to show the gap that each
decentralised method closes. The average is uniform (not weighted by local data size): it is
the consensus point that gossip with doubly stochastic weights converges to, which makes the
comparison like for like. The server reports each round's global model.

With a lossy ``--codec`` the clients' uploads are compressed (the server decodes each before it
averages); the global model goes out whole, as a server's downlink is rarely the bottleneck.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Mapping
from typing import Any

from gossip.conversation import Conversation
from gossip.exchange import message_seed
from gossip.learner import State
from gossip.message import Message, PeerId
from gossip.model_codec import ModelMessages
from gossip.protocols.base import COORDINATOR, Protocol, ProtocolContext, RoundReport, Settings
from gossip.robust import mix_screened
from gossip.validation import InvalidState, check_state

log = logging.getLogger(__name__)

TRAIN = "fedavg-train"  # the global model, to a sampled client; answered with UPDATE
UPDATE = "fedavg-update"
HELLO, BYE = "fedavg-hello", "fedavg-bye"
FINISHED = "fedavg-finished"


class FedAvgServer(Protocol):
    name = "fedavg-server"

    @classmethod
    def build(cls, context: ProtocolContext, settings: Settings, *, peers: list[PeerId], joining: bool) -> FedAvgServer:
        # A round cannot take longer than the slowest client's training and an exchange, twice over.
        slowest = max(settings.peer_speeds.step_times)
        return cls(
            context, clients=peers, sample_size=settings.sample_size, local_steps=settings.local_steps,
            round_timeout=2 * (settings.exchange_timeout + settings.local_steps * slowest), seed=settings.seed,
        )

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
        self.talk = Conversation(context.transport, context.clock, timeout=round_timeout, logger=log)
        self._reference = context.learner.state()
        self.models = ModelMessages(self._reference, context.gossip.codec)
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
        await asyncio.gather(*(self.talk.send(client, done) for client in sorted(self.clients)))

    async def _train(self, client: PeerId, request: Message) -> tuple[State, float] | None:
        reply = await self.talk.ask(client, request, unanswered=f"no update from {client} for round {request.round}")
        if reply is None:
            return None
        loss = reply.meta.get("loss")
        try:
            if reply.kind != UPDATE or not isinstance(loss, float | int):
                raise InvalidState(f"expected an {UPDATE!r} with a loss, got {reply.kind!r}")
            update = self.models.decode(reply.tensors, reply.codec, reply.meta)
        except InvalidState as reason:
            return self.talk.refuse(client, "invalid-model", f"its update: {reason}")
        return {**self._reference, **update}, float(loss)


class FedAvgClient(Protocol):
    name = "fedavg"
    label = "FedAvg (centralised reference, simulation only)"
    takes = {"sample_size": ""}
    catches_up = False
    one_model = True
    mixes_neighbours = False
    overlay = "server"
    final_label = "last round's model"
    real_peers = "fedavg needs a central server and is offered by `peer simulate` only; use --algorithm dpsgd"
    coordinator = FedAvgServer

    @classmethod
    def build(cls, context: ProtocolContext, settings: Settings, *, peers: list[PeerId], joining: bool) -> FedAvgClient:
        return cls(context, server=COORDINATOR, local_steps=settings.local_steps, joining=joining)

    @classmethod
    def for_swarm(cls, settings: Settings, peers: int) -> dict[str, Any]:
        if settings.sample_size is not None and settings.sample_size > peers:
            raise ValueError(f"--sample-size {settings.sample_size} is larger than the swarm of --peers {peers}")
        return {}

    @classmethod
    def describe_overlay(cls, summary: Mapping[str, Any]) -> str:
        return f"server, {summary['sample_size'] or 'all'} peers a round"

    def __init__(self, context: ProtocolContext, *, server: PeerId, local_steps: int, joining: bool = False):
        super().__init__(context)
        self.server = server
        self.local_steps = local_steps
        self.joining = joining
        self._finished = asyncio.Event()
        self.talk = Conversation(context.transport, context.clock, timeout=context.gossip.timeout, logger=log)
        self._reference = context.learner.state()
        self.models = ModelMessages(self._reference, context.gossip.codec)
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
        me = self.context.transport.peer_id
        if not await self.talk.send(self.server, Message(kind, me, 0)):
            log.warning("%s: could not reach the server", me)

    async def _on_finished(self, message: Message) -> None:
        if message.sender == self.server:
            self._finished.set()

    async def _on_train(self, message: Message) -> Message | None:
        if message.sender != self.server or self._finished.is_set():
            return None
        try:
            check_state(message.tensors, self._reference)
        except InvalidState as reason:
            return self.talk.refuse(message, "invalid-model", f"the global model: {reason}")
        learner = self.context.learner
        learner.load_state(message.tensors)
        # The learning-rate schedule follows the server's rounds, not how often this client was sampled.
        learner.set_progress(message.round * self.local_steps)
        loss = await self.context.clock.compute(learner.train, self.local_steps, steps=self.local_steps)
        me = self.context.transport.peer_id
        tensors, meta, codec = self.models.encode(learner.state(), message_seed(me, UPDATE, message.round))
        return Message(UPDATE, me, message.round, tensors, meta={"loss": loss, **meta}, codec=codec)
