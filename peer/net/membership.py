"""Swarm membership in the DHT: each peer announces a record under the swarm's key and
refreshes it before it expires; a peer's view is the set of live, compatible records.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import hivemind
from hivemind.utils import get_dht_time

from gossip.message import PeerId

log = logging.getLogger(__name__)


@contextmanager
def children_ignore_ctrl_c() -> Iterator[None]:
    """Processes started inside (a DHT process and its p2p daemon) ignore SIGINT.

    Ctrl-C reaches every process of the terminal's group; a DHT process that died of it would
    leave its owner unable to withdraw or shut it down, so the owner, which still gets Ctrl-C,
    stops it instead. Only the main thread may change signal handlers.
    """
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass(frozen=True)
class PeerRecord:
    peer_id: PeerId
    addresses: list[str]
    fingerprint: str  # task and model shapes: peers with different ones never mix
    round: int
    left: bool = False  # a tombstone: the peer withdrew before its record expired
    announced: float = 0.0  # DHT time of the announcement
    accuracy: float | None = None  # test accuracy at the peer's last evaluation

    @classmethod
    def parse(cls, peer_id: str, value: object) -> PeerRecord | None:
        """A record read from the DHT, which anyone can write to; None when malformed."""
        if not isinstance(value, dict):
            return None
        try:
            accuracy = value.get("accuracy")
            record = cls(
                peer_id=peer_id,
                addresses=[str(a) for a in value["addresses"]][:16],
                fingerprint=str(value["fingerprint"]),
                round=int(value["round"]),
                left=bool(value.get("left", False)),
                announced=float(value.get("announced", 0.0)),
                accuracy=float(accuracy) if accuracy is not None else None,
            )
        except (KeyError, TypeError, ValueError):
            return None
        if record.accuracy is not None and not 0 <= record.accuracy <= 1:  # NaN fails this too
            return replace(record, accuracy=None)
        return record


class Membership:
    def __init__(self, dht: hivemind.DHT, swarm: str, record: PeerRecord, *, ttl: float):
        self.dht = dht
        self.key = f"{swarm}.peers"
        self.record = record
        self.ttl = ttl
        self.live: dict[PeerId, PeerRecord] = {}  # compatible peers, self included
        self.seen: dict[PeerId, tuple[PeerRecord, float]] = {}  # every record read, with its expiry
        # Peers we could not reach, with the expiry of their record at that time: they stay out
        # of the view until they refresh their record, which a dead peer never does.
        self._suspects: dict[PeerId, float] = {}

    def evaluated(self, accuracy: float) -> None:
        """Announce this accuracy with the next refresh of our record."""
        self.record = replace(self.record, accuracy=accuracy)

    async def announce(self, round_: int) -> None:
        self.record = replace(self.record, round=round_, announced=get_dht_time())
        await self._store(self.record, get_dht_time() + self.ttl)

    async def _store(self, record: PeerRecord, expiration: float) -> None:
        value = asdict(record)
        del value["peer_id"]
        await self.dht.store(self.key, value, expiration, subkey=record.peer_id, return_future=True)

    async def refresh(self) -> dict[PeerId, PeerRecord]:
        found = await self.dht.get(self.key, latest=True, return_future=True)
        records: dict[PeerId, tuple[PeerRecord, float]] = {}
        if found is not None and isinstance(found.value, dict):
            for subkey, entry in found.value.items():
                record = PeerRecord.parse(str(subkey), getattr(entry, "value", None))
                if record is not None:
                    records[record.peer_id] = (record, entry.expiration_time)
        self.seen = records
        self._suspects = {
            peer: expiry for peer, expiry in self._suspects.items() if peer in records and records[peer][1] <= expiry
        }
        self.live = {
            peer: record
            for peer, (record, _) in records.items()
            if not record.left and record.fingerprint == self.record.fingerprint and peer not in self._suspects
        }
        self.live[self.record.peer_id] = self.record
        return self.live

    def compatible(self, peer: PeerId) -> bool:
        """False for a peer whose record shows another task or model; unknown peers get the benefit of the doubt."""
        seen = self.seen.get(peer)
        return seen is None or seen[0].fingerprint == self.record.fingerprint

    def suspect(self, peer: PeerId) -> None:
        """Leave out a peer that could not be reached, until its record shows it is alive."""
        if peer in self.seen and peer != self.record.peer_id:
            self._suspects[peer] = self.seen[peer][1]
            self.live.pop(peer, None)

    def view(self) -> list[PeerId]:
        return sorted(self.live)

    async def keep_alive(self, current_round) -> None:
        """Announce and refresh the view until cancelled, well within the record's lifetime."""
        while True:
            try:
                await self.announce(current_round())
                await self.refresh()
            except Exception as error:  # a DHT hiccup must not kill the peer; the next try may work
                log.warning("membership refresh failed: %r", error)
            await asyncio.sleep(self.ttl / 4)

    async def withdraw(self) -> None:
        # A later expiry wins in the DHT, so a tombstone that outlives the record replaces it.
        await self._store(replace(self.record, left=True), get_dht_time() + 2 * self.ttl)
