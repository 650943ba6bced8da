"""What a sampling peer knows of the swarm: for every peer, when it was last seen active and
whether it joined or left. Views travel with messages and are merged on receipt.

An entry is (last active round, membership index, left). Merging takes the later activity and
the membership entry with the higher index (a peer raises its own index at each JOIN or LEAVE,
so its latest announcement wins). The view doubles as a Lamport clock: the round estimate is
the highest activity it holds.

Who may claim what:
- A peer's membership (its index, and whether it left) counts only from that peer itself: a
  view heard from a sender gives the sender's own row whole, and of every other row only the
  activity. Nobody can make a third party leave, or freeze its index.
- A row about a peer this view does not hold enters only when that peer is known to the world
  (a member of the swarm), and a full view evicts its least recently active entry: made-up ids
  cannot fill it, and a real newcomer still gets in.
- Rounds are bounded by ``RoundAllowance``: claims may move the estimate a burst of rounds ahead,
  then no faster than an honest swarm can go.

On the wire a view is msgpack (never pickle), a list of [peer, active, index, left] rows,
carried as a uint8 tensor so that it is counted with the message's bytes. A message carries
the sender's own row and its most recently active others, at most ``MAX_SENT_ROWS`` in all, so
a view of any size fits every message.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection
from dataclasses import dataclass

import msgpack
import torch

from gossip.message import PeerId

VIEW_TENSOR = "view"
MAX_PEER_ID_LENGTH = 128
MAX_ENTRIES = 4096  # peers a view holds
MAX_SENT_ROWS = 1024  # rows a message carries: at most about 150 KB
_ROW_FIELDS = 4


class ViewError(ValueError):
    """A view from a peer that must not be merged: malformed, too large, or too far ahead."""


@dataclass(frozen=True)
class Entry:
    active: int  # the last round this peer was seen active
    index: int = 0  # how many JOIN or LEAVE announcements the peer has made
    left: bool = False

    def merged(self, other: Entry) -> Entry:
        membership = other if other.index > self.index else self
        return Entry(max(self.active, other.active), membership.index, membership.left)


class View:
    def __init__(self, me: PeerId, peers: list[PeerId] = (), *, max_entries: int = MAX_ENTRIES):
        self.me = me
        self.max_entries = max_entries
        self.entries: dict[PeerId, Entry] = {}
        self.merge({peer: Entry(0) for peer in peers})
        self.entries[me] = Entry(0)

    def estimate(self) -> int:
        """The round the swarm is at, as far as this view knows."""
        return max(entry.active for entry in self.entries.values())

    def touch(self, peer: PeerId, round_: int) -> None:
        """A sign of life from ``peer`` at ``round_`` (a message, a pong)."""
        self.merge({peer: Entry(round_)})

    def announce(self, left: bool) -> None:
        """Our own JOIN (``left`` False) or LEAVE, which wins over any earlier one of ours."""
        own = self.entries[self.me]
        self.entries[self.me] = Entry(own.active, own.index + 1, left)

    def merge(self, entries: dict[PeerId, Entry]) -> None:
        """Merge entries taken whole: our own records, or a peer's own row."""
        for peer, entry in entries.items():
            current = self.entries.get(peer)
            if current is not None:
                self.entries[peer] = current.merged(entry)
            elif self._room_for(entry):
                self.entries[peer] = entry

    def hear(self, sender: PeerId, entries: dict[PeerId, Entry], known: Collection[PeerId]) -> None:
        """Merge a view heard from ``sender``: its own row whole, the activity of the others, and
        only of peers this view holds or that are ``known`` (members). Our own row is ours alone."""
        for peer, entry in entries.items():
            if peer == sender:
                self.merge({peer: self._own_row(peer, entry)})
            elif peer != self.me and (peer in self.entries or peer in known):
                self.merge({peer: Entry(entry.active)})

    def cap(self, most: int) -> None:
        """Bring every activity past ``most`` (ours included) back to ``most``."""
        for peer, entry in self.entries.items():
            if entry.active > most:
                self.entries[peer] = Entry(most, entry.index, entry.left)

    def _own_row(self, peer: PeerId, entry: Entry) -> Entry:
        """A peer's own row, its index raised by two at most (a LEAVE and a JOIN since we last heard
        of it), so that no claim puts its later announcements out of reach."""
        current = self.entries.get(peer, Entry(0))
        return Entry(entry.active, min(entry.index, current.index + 2), entry.left)

    def _room_for(self, entry: Entry) -> bool:
        """Whether a new entry fits, evicting the least recently active one when the view is full."""
        if len(self.entries) < self.max_entries:
            return True
        oldest = min((p for p in self.entries if p != self.me), key=lambda p: (self.entries[p].active, p), default=None)
        if oldest is None or self.entries[oldest].active >= entry.active:
            return False
        del self.entries[oldest]
        return True

    def candidates(self, round_: int, inactivity: int) -> list[PeerId]:
        """Peers that may be sampled for ``round_``: not left, and seen active recently enough."""
        return [
            peer for peer, entry in self.entries.items() if not entry.left and entry.active >= round_ - inactivity
        ]

    def left(self, peer: PeerId) -> bool:
        entry = self.entries.get(peer)
        return entry is not None and entry.left

    def encode(self, max_rows: int | None = MAX_SENT_ROWS) -> dict[str, torch.Tensor]:
        """Our row and the most recently active others, ``max_rows`` in all (None: every row)."""
        others = [peer for peer in self.entries if peer != self.me]
        if max_rows is not None and len(others) >= max_rows:
            others = heapq.nlargest(max_rows - 1, others, key=lambda p: (self.entries[p].active, p))
        rows = [[peer, e.active, e.index, e.left] for peer, e in ((p, self.entries[p]) for p in [self.me, *others])]
        raw = msgpack.packb(rows, use_bin_type=True)
        return {VIEW_TENSOR: torch.frombuffer(bytearray(raw), dtype=torch.uint8)}


class RoundAllowance:
    """How far others' claims may move a view's estimate: ``burst`` rounds at once, refilled at
    ``rate`` rounds per second (a token bucket). An honest swarm goes no faster than ``rate``,
    so a peer that lagged catches up at once; a liar who repeats ever higher claims gains
    ``burst`` and then no more than the swarm itself could have gone meanwhile."""

    def __init__(self, burst: int, rate: float):
        self.burst = burst
        self.rate = rate
        self._room = float(burst)
        self._at: float | None = None  # when the room was last worked out

    def ceiling(self, estimate: int, now: float) -> int:
        """The highest round a claim may name now."""
        if self._at is not None:
            self._room = min(float(self.burst), self._room + (now - self._at) * self.rate)
        self._at = now
        return estimate + int(self._room)

    def spend(self, before: int, after: int) -> None:
        """Claims moved the estimate from ``before`` to ``after``."""
        self._room = max(0.0, self._room - max(0, after - before))


def decode_view(tensors: dict[str, torch.Tensor], *, max_round: int, max_entries: int = MAX_SENT_ROWS) -> dict[PeerId, Entry]:
    """The entries of a received view; ViewError when it is malformed, too large or claims a round
    past ``max_round``."""
    raw = tensors.get(VIEW_TENSOR)
    if raw is None or raw.dtype != torch.uint8 or raw.dim() != 1:
        raise ViewError(f"no {VIEW_TENSOR!r} tensor of bytes")
    try:
        rows = msgpack.unpackb(
            raw.numpy().tobytes(), raw=False, max_str_len=MAX_PEER_ID_LENGTH, max_bin_len=0, max_ext_len=0,
            max_map_len=0, max_array_len=max(max_entries, _ROW_FIELDS),
        )
    except ValueError as error:
        raise ViewError(f"view does not unpack: {str(error) or type(error).__name__}") from None
    if not isinstance(rows, list):
        raise ViewError(f"view must be a list of rows, got {type(rows).__name__}")
    entries: dict[PeerId, Entry] = {}
    for row in rows:
        if not (isinstance(row, list) and len(row) == _ROW_FIELDS):
            raise ViewError("a view row is not [peer, active, index, left]")
        peer, active, index, left = row
        if not isinstance(peer, str) or not peer:
            raise ViewError(f"view peer {peer!r} is not a non-empty string")
        if not (_is_int(active) and _is_int(index) and isinstance(left, bool)):
            raise ViewError(f"view row for {peer!r} has a malformed field")
        if not 0 <= active <= max_round:
            raise ViewError(f"view claims {peer!r} active at round {active}, beyond the {max_round} accepted")
        if index < 0:
            raise ViewError(f"view row for {peer!r} has a negative index")
        if peer in entries:
            raise ViewError(f"view lists {peer!r} twice")
        entries[peer] = Entry(active, index, left)
    return entries


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
