"""Decentralised sampling: every peer derives the same sample of a round from what it knows.

Candidates are ordered by md5("<peer>-<round>") (ties by id); the sample is the first k of
them that answer a ping. Two peers with the same candidates get the same sample without a
word exchanged. A peer that failed a ping is remembered as suspect and skipped (instead of
costing a ping timeout in every later round) until it shows a sign of life.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Iterable

from gossip.message import PeerId


def hash_order(peers: Iterable[PeerId], round_: int) -> list[PeerId]:
    return sorted(peers, key=lambda peer: (hashlib.md5(f"{peer}-{round_}".encode()).digest(), peer))


class Liveness:
    """Finds live peers by pinging, and remembers which ones did not answer."""

    def __init__(self, ping: Callable[[PeerId], Awaitable[bool]]):
        self._ping = ping
        # A suspect, with the last round it was known active when it failed: a view that shows
        # it active later is a sign of life.
        self._suspects: dict[PeerId, int] = {}

    def suspected(self, peer: PeerId) -> bool:
        return peer in self._suspects

    def suspect(self, peer: PeerId, active: int) -> None:
        self._suspects[peer] = active

    def heard_from(self, peer: PeerId) -> None:
        self._suspects.pop(peer, None)

    def seen_active(self, peer: PeerId, active: int) -> None:
        if peer in self._suspects and active > self._suspects[peer]:
            del self._suspects[peer]

    async def first_live(self, order: list[PeerId], k: int, active: Callable[[PeerId], int]) -> list[PeerId]:
        """The first ``k`` peers of ``order`` that answer, in that order; fewer when the order runs out.

        Pings go out k at a time, and each failure is replaced by the next peer in the order.
        """
        remaining = [peer for peer in order if peer not in self._suspects]
        live: list[PeerId] = []
        while len(live) < k and remaining:
            batch, remaining = remaining[: k - len(live)], remaining[k - len(live) :]
            answers = await asyncio.gather(*(self._ping(peer) for peer in batch))
            for peer, answered in zip(batch, answers):
                if answered:
                    live.append(peer)
                else:
                    self.suspect(peer, active(peer))
        return live
