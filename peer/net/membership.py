"""Swarm membership in the DHT: each peer announces a record under the swarm's key and
refreshes it before it expires; a peer's view is the set of live, compatible records.

A record's subkey is its owner's public key, and the DHT's signature validator refuses any
change to it that the owner did not sign; readers derive the peer id from that key, so nobody
can announce, or withdraw, a peer but the peer itself. Whatever else a reader finds under the
key (unsigned records, records that claim another id, non-members of a private swarm) is
ignored and counted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPublicKey

from gossip.message import PeerId
from peer.net.access import PUBLIC, Access, peer_id_of

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
    loss: float | None = None  # test loss at that evaluation
    proof: str = ""  # in a private swarm, the swarm key's HMAC of peer_id
    client: bool = False  # accepts no connections: nobody dials it, it fetches models

    @classmethod
    def parse(cls, peer_id: str, value: object) -> PeerRecord | None:
        """A record read from the DHT, which anyone can write to; None when malformed."""
        if not isinstance(value, dict) or value.get("peer_id") != peer_id:
            return None
        try:
            accuracy, loss = value.get("accuracy"), value.get("loss")
            record = cls(
                peer_id=peer_id,
                addresses=[str(a) for a in value["addresses"]][:16],
                fingerprint=str(value["fingerprint"]),
                round=int(value["round"]),
                left=bool(value.get("left", False)),
                announced=float(value.get("announced", 0.0)),
                accuracy=float(accuracy) if accuracy is not None else None,
                loss=float(loss) if loss is not None else None,
                proof=str(value.get("proof", ""))[:128],
                client=value.get("client", False) is True,
            )
        except (KeyError, TypeError, ValueError):
            return None
        if record.accuracy is not None and not 0 <= record.accuracy <= 1:  # NaN fails this too
            record = replace(record, accuracy=None)
        if record.loss is not None and not 0 <= record.loss < math.inf:
            record = replace(record, loss=None)
        return record


_OWNER = re.compile(re.escape(b"[owner:") + rb"(.+)" + re.escape(b"]"), re.DOTALL)
_MAX_OWNER_KEY_BYTES = 4096
# A stranger's pull or stream may make us re-read the members' records, but not more often than this.
MIN_REFRESH_INTERVAL = 1.0


def record_owner(subkey: object, known: dict[bytes, PeerId]) -> PeerId | None:
    """The peer id whose key signed the record under ``subkey``; None for an unsigned subkey."""
    if not isinstance(subkey, bytes) or len(subkey) > _MAX_OWNER_KEY_BYTES:
        return None
    if subkey not in known:
        match = _OWNER.fullmatch(subkey)
        try:
            known[subkey] = peer_id_of(RSAPublicKey.from_bytes(match.group(1))) if match else None
        except (ValueError, TypeError):  # not an RSA key in OpenSSH form
            known[subkey] = None
    return known[subkey]


class Membership:
    def __init__(
        self, dht: hivemind.DHT, swarm: str, record: PeerRecord, *, ttl: float,
        signer: RSASignatureValidator | None = None, access: Access = PUBLIC,
    ):
        """``signer`` holds this peer's identity key (the DHT's validator); a reader that announces nothing needs none."""
        self.dht = dht
        self.key = access.dht_key(swarm)
        self.access = access
        self.record = replace(record, proof=access.record_proof(record.peer_id))
        self.ttl = ttl
        self._subkey = signer.local_public_key if signer else None
        self.live: dict[PeerId, PeerRecord] = {}  # compatible peers, self included
        self.seen: dict[PeerId, tuple[PeerRecord, float]] = {}  # every record read, with its expiry
        self.rejected: Counter[str] = Counter()  # records ignored, by reason
        self._owners: dict[bytes, PeerId | None] = {}
        self._refreshed = float("-inf")
        self._rereading = asyncio.Lock()
        # Peers we could not reach, with the expiry of their record at that time: they stay out
        # of the view until they refresh their record, which a dead peer never does.
        self._suspects: dict[PeerId, float] = {}

    def evaluated(self, accuracy: float, loss: float | None = None) -> None:
        """Announce this accuracy and loss with the next refresh of our record."""
        self.record = replace(self.record, accuracy=accuracy, loss=loss)

    async def announce(self, round_: int) -> None:
        self.record = replace(self.record, round=round_, announced=get_dht_time())
        await self._store(self.record, get_dht_time() + self.ttl)

    async def _store(self, record: PeerRecord, expiration: float) -> None:
        if self._subkey is None:
            raise RuntimeError("a membership without a signer only reads records")
        stored = await self.dht.store(self.key, asdict(record), expiration, subkey=self._subkey, return_future=True)
        if not stored:
            log.warning("the DHT did not store our record; is another process using this identity?")

    async def refresh(self) -> dict[PeerId, PeerRecord]:
        self._refreshed = time.monotonic()
        found = await self.dht.get(self.key, latest=True, return_future=True)
        records: dict[PeerId, tuple[PeerRecord, float]] = {}
        entries = found.value.items() if found is not None and isinstance(found.value, dict) else []
        if len(self._owners) > 4 * len(entries) + 64:
            self._owners.clear()
        for subkey, entry in entries:
            owner = record_owner(subkey, self._owners)
            if owner is None:
                self._reject("unsigned-record", subkey)
                continue
            record = PeerRecord.parse(owner, getattr(entry, "value", None))
            if record is None:
                self._reject("malformed-record", owner)
            elif not self.access.admits_record(owner, record.proof):
                self._reject("not-member", owner)
            else:
                records[owner] = (record, entry.expiration_time)
        # A reading may come from a DHT node that missed some peers' latest stores: a record read
        # before stays until it expires (a peer that left says so with a tombstone, which is read).
        now = get_dht_time()
        records = {
            **{peer: seen for peer, seen in self.seen.items() if seen[1] > now}, **records
        }
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

    def joined(self) -> set[PeerId]:
        """The peers of this swarm and kind whose records were read, live or gone since (a fast
        peer may finish its run and leave before a slow one reads its record), and this one."""
        mine = self.record.fingerprint
        return {peer for peer, (record, _) in self.seen.items() if record.fingerprint == mine} | {self.record.peer_id}

    def _reject(self, reason: str, who: object) -> None:
        self.rejected[reason] += 1
        log.debug("ignored a membership record (%s): %.80r", reason, who)

    async def is_member(self, peer: PeerId) -> bool:
        """Whether ``peer`` has a compatible record, its own signed word that it is of this swarm.

        A peer that left is still who it was: what it sent before its tombstone was read (its last
        models, its goodbye) is its own. An unknown peer may have joined since our last reading (a
        newcomer's first pull comes right after its first announcement), so it waits for a reading
        that started after it asked; strangers share those readings, and there is at most one a
        second.
        """
        if self._member(peer):
            return True
        asked = time.monotonic()
        async with self._rereading:
            if self._refreshed < asked:
                await asyncio.sleep(self._refreshed + MIN_REFRESH_INTERVAL - time.monotonic())
                await self.refresh()
        return self._member(peer)

    def _member(self, peer: PeerId) -> bool:
        seen = self.seen.get(peer)
        return seen is not None and seen[0].fingerprint == self.record.fingerprint

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

    def addresses(self, peer: PeerId) -> list[str]:
        """The addresses a live peer's record announces (none for a peer in client mode)."""
        record = self.live.get(peer)
        return list(record.addresses) if record else []

    def clients(self) -> set[PeerId]:
        """The live peers that accept no connections (client mode)."""
        return {peer for peer, record in self.live.items() if record.client}

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
