"""One running peer: a trainer and a protocol wired to a transport and a clock, with its metrics.

The same class runs in the simulator and on the network; only the transport and clock differ.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gossip.protocols import Protocol, RoundReport
from gossip.transport import Clock, Transport
from peer.metrics import MetricsLog, RoundRecord
from peer.trainer import Trainer


class PeerNode:
    def __init__(
        self,
        transport: Transport,
        clock: Clock,
        trainer: Trainer,
        metrics: MetricsLog,
        *,
        rounds: int,
        eval_every: int,
        on_record: Callable[[RoundRecord], None] | None = None,
        pace: float = 0.0,
        wall_time: bool = False,
        swarm_bytes: Callable[[], int] | None = None,
        eval_rounds: bool = True,
    ):
        self.transport = transport
        self.clock = clock
        self.trainer = trainer
        self.metrics = metrics
        self.rounds = rounds
        self.eval_every = eval_every
        self.on_record = on_record
        self.pace = pace  # minimum seconds per round
        self.wall_time = wall_time  # records carry the Unix time (real peers; a simulation stays reproducible)
        self.swarm_bytes = swarm_bytes  # a simulator's count of the bytes every peer has sent
        # False: only its last round is evaluated (a simulated peer outside the --eval-peers sample).
        self.eval_rounds = eval_rounds
        self.protocol: Protocol | None = None
        self._round_started = 0.0

    @property
    def peer_id(self) -> str:
        return self.transport.peer_id

    async def round_finished(self, report: RoundReport) -> None:
        last = report.last or report.round == self.rounds - 1
        # Every eval_every-th round, or the first after it when the peer jumped past it.
        due = (report.round + 1) // self.eval_every > (report.round + 1 - report.span) // self.eval_every
        accuracy = loss = squared_error = None
        if last or (due and self.eval_rounds):
            accuracy, loss = await self.clock.compute(self.trainer.evaluate, steps=0)
            squared_error = self.trainer.squared_error()
        counters = self.transport.counters
        record = RoundRecord(
            round=report.round,
            peer=self.peer_id,
            accuracy=accuracy,
            loss=loss,
            train_loss=report.train_loss,
            bytes_sent=counters.bytes_sent,
            bytes_received=counters.bytes_received,
            virtual_time=self.clock.now(),
            neighbours_expected=report.neighbours_expected,
            neighbours_heard=report.neighbours_heard,
            rejected=counters.rejected,
            local_steps=report.local_steps,
            exchange_seconds=report.exchange_seconds,
            wall_time=time.time() if self.wall_time else None,
            swarm_bytes_sent=self.swarm_bytes() if self.swarm_bytes else None,
            squared_error=squared_error,
        )
        self.metrics.write(record)
        if self.on_record:
            self.on_record(record)
        if self.pace:
            await self.clock.sleep(self._round_started + self.pace - self.clock.now())
        self._round_started = self.clock.now()

    async def run(self, first_round: int = 0) -> None:
        if self.protocol is None:
            raise RuntimeError("PeerNode.protocol must be set before run()")
        self._round_started = self.clock.now()
        await self.protocol.run(self.rounds, first_round)
