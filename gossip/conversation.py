"""The plumbing of a protocol driven by messages: sends and requests with a deadline, counted
refusals, and background work that ends with the run.

MoDeST, SRRW and FedAvg react to what arrives: a handler starts training or hands a model on and
returns, and a peer that does not answer must not hold anyone up. They share these few lines, so
that no protocol forgets a deadline, counts a refusal it does not log, or leaves a task running
after its peer has stopped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from gossip.message import Message, PeerId
from gossip.transport import Clock, PeerUnreachable, Transport

log = logging.getLogger(__name__)


class Conversation:
    """What one protocol says to its peers, and the work it starts in the background.

    A protocol holds one for its run and closes it when the run ends: a task left behind would
    act for a peer that has stopped (train, send a model, re-issue a token). Lines are logged to
    ``logger``, the protocol's own, so that they read as the protocol's wherever they are filtered.
    """

    def __init__(self, transport: Transport, clock: Clock, *, timeout: float, logger: logging.Logger = log):
        self.transport = transport
        # Deadlines run on the protocol's clock, which in simulation is virtual time.
        self.clock = clock
        self.timeout = timeout
        self.log = logger
        # In the order started (a set's order would differ from run to run): the simulator replays
        # a run exactly, the order in which closing cancels them included.
        self._tasks: dict[asyncio.Task, None] = {}
        self._words: dict[asyncio.Task, None] = {}  # one-way messages on their way, which drain() waits for
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether the run is over: handlers that come now should do nothing."""
        return self._closed

    async def send(self, peer: PeerId, message: Message) -> bool:
        """Send a one-way message; False when ``peer`` is unreachable or too slow to take it.

        A peer that stops reading must not hold us up, however long the message takes to transmit.
        """
        try:
            async with self.clock.timeout(self.timeout):
                await self.transport.send(peer, message)
            return True
        except (PeerUnreachable, TimeoutError) as reason:
            self.log.info("%s: could not send a %s to %s: %r", self.transport.peer_id, message.kind, peer, reason)
            return False

    async def ask(
        self, peer: PeerId, message: Message, *, timeout: float | None = None, unanswered: str | None = None
    ) -> Message | None:
        """The reply to a request, not yet looked at; None when none came within ``timeout`` (by
        default the conversation's). Silence is routine for most requests, so it is logged only
        when the caller says what it means (``unanswered``), with the reason."""
        try:
            return await self.transport.request(peer, message, timeout=self.timeout if timeout is None else timeout)
        except (TimeoutError, PeerUnreachable) as reason:
            if unanswered is not None:
                self.log.info("%s: %s: %r", self.transport.peer_id, unanswered, reason)
            return None

    def refuse(self, refused: Message | PeerId, reason: str, detail: str, *, level: int = logging.WARNING) -> None:
        """Count a refused message under ``reason`` and log why, so that what a peer was sent and
        did not use shows both in its counters and in its log. Returns None, for handlers that
        refuse and return in one line."""
        self.transport.counters.reject(reason)
        me = self.transport.peer_id
        if isinstance(refused, Message):
            self.log.log(level, "%s: refused a %s from %s (%s): %s", me, refused.kind, refused.sender, reason, detail)
        else:
            self.log.log(level, "%s: refused a message from %s (%s): %s", me, refused, reason, detail)

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task | None:
        """Run ``coroutine`` in the background until it ends or the conversation closes; once
        closed, it is closed unstarted and None is returned."""
        if self._closed:
            coroutine.close()
            return None
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks[task] = None
        task.add_done_callback(self._tasks.pop)
        return task

    def tell(self, peer: PeerId, message: Message) -> None:
        """Send a one-way message in the background, so that the handler that says it need not wait."""
        task = self.spawn(self.send(peer, message))
        if task is not None:
            self._words[task] = None
            task.add_done_callback(self._words.pop)

    async def drain(self) -> None:
        """Wait for the messages told so far: word that the others need before this peer stops
        (each send is bounded by the timeout)."""
        if self._words:
            await asyncio.wait(set(self._words))

    async def aclose(self) -> None:
        """Cancel the background work and wait until it has ended: nothing outlives the run."""
        self._closed = True
        tasks = [task for task in self._tasks if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            # Exceptions are left unretrieved, so that asyncio still reports any a task raised.
            await asyncio.wait(tasks)
