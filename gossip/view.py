"""What a sampling peer knows of the swarm: for every peer, when it was last seen active and
whether it joined or left. Views travel with messages and are merged on receipt.

An entry is (last active round, membership index, left). Merging takes the later activity and
the membership entry with the higher index (a peer raises its own index at each JOIN or LEAVE,
so its latest announcement wins). The view doubles as a Lamport clock: the round estimate is
the highest activity it holds. A round from a stranger is bounded by how far ahead of our own
estimate it may be, so one inflated entry cannot move everybody's estimate.

On the wire a view is msgpack (never pickle), a list of [peer, active, index, left] rows,
carried as a uint8 tensor so that it is counted with the message's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import torch

from gossip.message import PeerId

VIEW_TENSOR = "view"
MAX_PEER_ID_LENGTH = 128
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
    def __init__(self, me: PeerId, peers: list[PeerId] = (), *, max_entries: int = 16_384):
        self.me = me
        self.max_entries = max_entries
        self.entries: dict[PeerId, Entry] = {peer: Entry(0) for peer in peers}
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
        for peer, entry in entries.items():
            current = self.entries.get(peer)
            if current is not None:
                self.entries[peer] = current.merged(entry)
            elif len(self.entries) < self.max_entries:
                self.entries[peer] = entry

    def candidates(self, round_: int, inactivity: int) -> list[PeerId]:
        """Peers that may be sampled for ``round_``: not left, and seen active recently enough."""
        return [
            peer for peer, entry in self.entries.items() if not entry.left and entry.active >= round_ - inactivity
        ]

    def left(self, peer: PeerId) -> bool:
        entry = self.entries.get(peer)
        return entry is not None and entry.left

    def encode(self) -> dict[str, torch.Tensor]:
        rows = [[peer, e.active, e.index, e.left] for peer, e in self.entries.items()]
        raw = msgpack.packb(rows, use_bin_type=True)
        return {VIEW_TENSOR: torch.frombuffer(bytearray(raw), dtype=torch.uint8)}


def decode_view(tensors: dict[str, torch.Tensor], *, max_round: int, max_entries: int = 16_384) -> dict[PeerId, Entry]:
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
