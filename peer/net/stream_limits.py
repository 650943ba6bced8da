"""What incoming streams may cost this peer, whoever opens them.

Anyone who can reach our p2p daemon can open streams to us, so the transport admits a stream
only within caps on open streams (per peer and in all), gives its header a short deadline and
its payload one that follows the payload's size, makes a header and then a payload reserve
their bytes from a budget before they are buffered, and ignores for a while a peer whose
streams keep being refused. Every table here is bounded, so made-up identities cannot grow one.
An honest sender keeps within these caps on its own (``StreamLimits.streams_to_peer``).

The budget of buffered bytes (``ByteBudget``) has a fixed share per sender: one sender's
streams together hold at most ``buffered_messages_per_sender`` messages of the largest size,
all senders together at most ``buffered_messages``. A header reserves the length its prefix
announces before it is read, and keeps it while its payload's size is reserved and read. So
however many streams a few senders keep stalled, a sender holding nothing finds room at once
while at most (buffered_messages - 1) // buffered_messages_per_sender others (7 by default)
hold their whole share. The share does not grow while few senders hold bytes: room a sender
took while it was alone could not be taken back from it when others came.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields

from gossip.message import PeerId


@dataclass(frozen=True)
class StreamLimits:
    """Caps on incoming streams. The defaults leave honest gossip untouched: a neighbour sends
    one model per gossip step and now and then a request, a handful of streams at a time."""

    max_streams: int = 256  # open incoming streams, all peers together
    max_streams_per_peer: int = 8
    # Streams from one peer that wait for its membership to be confirmed (a newcomer, or a member
    # whose record the last readings missed), apart from its admitted ones.
    max_unverified_per_peer: int = 32
    # Streams from one member that wait for room among its open streams (at most header_timeout
    # each), apart from them: a burst that a busy receiver has not read yet waits rather than
    # being refused.
    max_waiting_per_peer: int = 32
    # Bytes buffered across all incoming streams, headers and payloads, in messages of the largest
    # size that Limits allows (its largest header and payload); a header or payload past the budget,
    # or past its sender's share of it, waits (within its deadline) for others to finish.
    buffered_messages: int = 16
    buffered_messages_per_sender: int = 2
    header_timeout: float = 5.0  # seconds from admission until the header has arrived
    # The payload's deadline, counted from its header: a grace plus its size at this rate
    # (125 kB/s = 1 Mbit/s, well below any link a peer trains over).
    payload_grace: float = 10.0
    min_payload_rate: float = 125_000.0  # bytes per second
    # A peer with this many refused streams within strike_window seconds is ignored for
    # ignore_for seconds; at most max_offenders peers are remembered, the least recent forgotten.
    strikes: int = 8
    strike_window: float = 60.0
    ignore_for: float = 60.0
    max_offenders: int = 4096

    def __post_init__(self) -> None:
        for field in fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"StreamLimits.{field.name} must be > 0, got {getattr(self, field.name)}")
        if self.max_streams_per_peer > self.max_streams:
            raise ValueError(
                f"StreamLimits.max_streams_per_peer ({self.max_streams_per_peer}) exceeds max_streams ({self.max_streams})"
            )
        if self.buffered_messages_per_sender > self.buffered_messages:
            raise ValueError(
                f"StreamLimits.buffered_messages_per_sender ({self.buffered_messages_per_sender}) exceeds "
                f"buffered_messages ({self.buffered_messages})"
            )

    def payload_timeout(self, size: int) -> float:
        return self.payload_grace + size / self.min_payload_rate

    @property
    def streams_to_peer(self) -> int:
        """Streams this peer opens to one peer at once, until that peer has closed them: half of
        what a receiver with these limits admits, so that the streams it has not closed yet when
        this peer gives up on them (it stopped waiting; the receiver will close them soon) still
        fit within its cap."""
        return max(1, self.max_streams_per_peer // 2)


class Waiters:
    """Tasks waiting for a condition on shared counts, woken to check it again whenever one changes."""

    def __init__(self) -> None:
        self._futures: list[asyncio.Future[None]] = []

    async def until(self, holds: Callable[[], bool]) -> None:
        while not holds():
            future = asyncio.get_running_loop().create_future()
            self._futures.append(future)
            try:
                await future
            finally:
                self._futures.remove(future)

    def wake(self) -> None:
        for future in self._futures:
            if not future.done():
                future.set_result(None)


class OpenStreams:
    """How many incoming streams each peer has open; entries go when their count drops to zero."""

    def __init__(self, limits: StreamLimits):
        self._limits = limits
        self._per_peer: Counter[PeerId] = Counter()
        self.total = 0
        self._waiters = Waiters()

    async def room_for(self, peer: PeerId) -> None:
        """Wait until ``peer`` has fewer streams open than its cap."""
        await self._waiters.until(lambda: not self.full_for(peer))

    def of(self, peer: PeerId) -> int:
        return self._per_peer[peer]

    def full_for(self, peer: PeerId) -> bool:
        return self._per_peer[peer] >= self._limits.max_streams_per_peer

    def full(self) -> bool:
        return self.total >= self._limits.max_streams

    def open(self, peer: PeerId) -> None:
        self._per_peer[peer] += 1
        self.total += 1

    def close(self, peer: PeerId) -> None:
        self.total -= 1
        self._per_peer[peer] -= 1
        if not self._per_peer[peer]:
            del self._per_peer[peer]
        self._waiters.wake()


class ByteBudget:
    """Bytes that incoming streams hold at once: at most ``share`` for one sender's streams
    together and ``capacity`` for all. A header or payload reserves its announced size before its
    buffer exists, waiting while its sender's share or the budget is spent, and returns it when
    done with."""

    def __init__(self, capacity: int, share: int):
        if share > capacity:
            raise ValueError(f"a sender's share of {share} bytes exceeds the budget of {capacity}")
        self.capacity = capacity
        self.share = share
        self.used = 0
        self.peak = 0  # the most ever reserved at once
        # Only senders that hold bytes now, so at most one entry per open stream.
        self._held: Counter[PeerId] = Counter()
        self._waiters = Waiters()

    def held_by(self, sender: PeerId) -> int:
        return self._held[sender]

    def within_share(self, sender: PeerId, size: int) -> bool:
        return self._held[sender] + size <= self.share

    def _fits(self, sender: PeerId, size: int) -> bool:
        return self.within_share(sender, size) and self.used + size <= self.capacity

    @asynccontextmanager
    async def reserve(self, sender: PeerId, size: int) -> AsyncIterator[None]:
        if size > self.share:
            raise ValueError(f"{size} bytes can never fit a sender's share of {self.share}")
        await self._waiters.until(lambda: self._fits(sender, size))
        self._held[sender] += size
        self.used += size
        self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            self.used -= size
            self._held[sender] -= size
            if not self._held[sender]:
                del self._held[sender]
            self._waiters.wake()


@dataclass
class _Record:
    window_start: float
    strikes: int = 0
    ignored_until: float = 0.0


class Offenders:
    """Peers whose streams were refused, and those ignored for a while for it.

    A peer with ``strikes`` refusals within ``strike_window`` seconds is ignored for
    ``ignore_for`` seconds; nothing it does meanwhile prolongs that, so an honest peer that
    went wrong for a moment is heard again. The table keeps the ``max_offenders`` peers that
    offended last.
    """

    def __init__(self, limits: StreamLimits, clock: Callable[[], float] = time.monotonic):
        self._limits = limits
        self._clock = clock
        self._records: OrderedDict[PeerId, _Record] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def ignored(self, peer: PeerId) -> bool:
        record = self._records.get(peer)
        return record is not None and self._clock() < record.ignored_until

    def strike(self, peer: PeerId) -> bool:
        """Count one refusal; True when it makes the peer ignored."""
        if self.ignored(peer):  # a stream it opened before it was ignored
            return False
        now = self._clock()
        record = self._records.pop(peer, None)
        if record is None or now - record.window_start > self._limits.strike_window:
            record = _Record(window_start=now)
        self._records[peer] = record  # the most recent offender goes last, the first to go is the oldest
        if len(self._records) > self._limits.max_offenders:
            self._records.popitem(last=False)
        record.strikes += 1
        if record.strikes < self._limits.strikes:
            return False
        record.ignored_until = now + self._limits.ignore_for
        record.strikes = 0
        return True
