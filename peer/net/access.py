"""Who may join a swarm.

Every peer's identity is an RSA key: libp2p derives the peer id from it, and the same key signs
the peer's membership record, so a record can only be written by the peer it names. A private
swarm adds a shared secret, the swarm key: a record counts only with an HMAC of the peer's id
under the key, and every stream opens with a fresh HMAC of its two ends, a time and a nonce, so
that a peer without the key is refused before any of its bytes are buffered. ``--allow-peers``
restricts a swarm to listed peer ids, on records and on streams alike.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import os
import secrets
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import base58
import multihash
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import DecodeError
from hivemind.p2p import P2P
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from gossip.message import PeerId
from peer.errors import ConfigError

SWARM_KEY_BYTES = 32
_NONCE_BYTES = 16
_STAMP = struct.Struct(">d")
STREAM_PROOF_BYTES = _STAMP.size + _NONCE_BYTES + hashlib.sha256().digest_size
# Clocks of members may differ by this much; a stream proof older than this is refused.
PROOF_WINDOW_SECONDS = 120.0
# How far ahead of ours a sender's clock may run. A proof stays valid until its stamp is
# PROOF_WINDOW_SECONDS old, so a stamp from the future would make a proof usable (and its nonce
# worth remembering) for longer; tight, because clocks kept by NTP agree within a second. The
# trade-off: a member whose clock runs further ahead than this is refused (stale-proof) by the
# others until it is set right, though it still accepts theirs.
PROOF_FUTURE_SECONDS = 10.0
# Nonces remembered against replay: at one stream per message this is hundreds per second for the window.
MAX_REMEMBERED_NONCES = 1 << 17


class AccessError(ConfigError):
    """A swarm key, peer list or identity file that cannot be used; the message says what to do."""


def access_from(swarm_key: Path | None, allow_peers: Path | None) -> Access:
    return Access(load_swarm_key(swarm_key) if swarm_key else None, load_allowed_peers(allow_peers) if allow_peers else None)


def generate_swarm_key(path: Path) -> None:
    """Write a new random swarm key, readable by its owner only; an existing file is never overwritten."""
    try:
        with open(path, "x") as f:
            os.chmod(path, 0o600)
            f.write(secrets.token_hex(SWARM_KEY_BYTES) + "\n")
    except FileExistsError:
        raise AccessError(f"{path} already exists; a swarm key is never overwritten, choose another --out") from None
    except OSError as error:
        raise AccessError(f"cannot write the swarm key to {path}: {error.strerror}") from None


def load_swarm_key(path: Path) -> bytes:
    try:
        text = path.read_text().strip()
    except OSError as error:
        raise AccessError(f"cannot read --swarm-key {path}: {error.strerror}; make one with `peer keygen --out FILE`") from None
    except UnicodeDecodeError:
        text = ""
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != SWARM_KEY_BYTES:
        raise AccessError(
            f"--swarm-key {path} is not a swarm key ({2 * SWARM_KEY_BYTES} hex digits); make one with `peer keygen --out FILE`"
        )
    return key


def load_allowed_peers(path: Path) -> frozenset[PeerId]:
    """Peer ids, one per line; blank lines and text after ``#`` are ignored."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise AccessError(f"cannot read --allow-peers {path}: {error}") from None
    peers = set()
    for number, line in enumerate(lines, 1):
        peer = line.split("#", 1)[0].strip()
        if not peer:
            continue
        if not _is_peer_id(peer):
            raise AccessError(f"--allow-peers {path}, line {number}: {peer[:60]!r} is not a peer id (like 12D3KooW... or Qm...)")
        peers.add(peer)
    if not peers:
        raise AccessError(f"--allow-peers {path} lists no peer ids; list one per line")
    return frozenset(peers)


def _is_peer_id(text: str) -> bool:
    try:
        multihash.decode(base58.b58decode(text))
    except (ValueError, TypeError):
        return False
    return True


def load_identity(path: Path) -> RSAPrivateKey:
    """The RSA key of a libp2p identity file, made if missing (as the p2p daemon would)."""
    if not path.exists():
        P2P.generate_identity(str(path))
    try:
        key = crypto_pb2.PrivateKey.FromString(path.read_bytes())
    except DecodeError:
        raise AccessError(f"identity {path} is not a libp2p private key; remove it to make a new one") from None
    if key.key_type != crypto_pb2.KeyType.RSA:
        raise AccessError(
            f"identity {path} holds a {crypto_pb2.KeyType.Name(key.key_type)} key; peers sign their records with RSA "
            "identities, so give a new --identity path and one will be made"
        )
    try:
        private = RSAPrivateKey.__new__(RSAPrivateKey)
        private.__setstate__({"_private_key": key.data})  # hivemind's only way in from DER bytes
    except ValueError:
        raise AccessError(f"identity {path} holds a damaged RSA key; remove it to make a new one") from None
    return private


def peer_id_of(public_key: RSAPublicKey) -> PeerId:
    """The libp2p peer id of an RSA key: the SHA-256 multihash of its protobuf-encoded public key."""
    der = public_key._public_key.public_bytes(  # hivemind offers the key in OpenSSH form only
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.RSA, data=der).SerializeToString()
    return base58.b58encode(multihash.encode(hashlib.sha256(encoded).digest(), "sha2-256")).decode()


@dataclass(frozen=True)
class Access:
    """The swarm's rules of entry: a swarm key, a list of allowed peers, both or neither (a public swarm)."""

    swarm_key: bytes | None = None
    allowed: frozenset[PeerId] | None = None

    @property
    def private(self) -> bool:
        return self.swarm_key is not None

    def dht_key(self, swarm: str) -> str:
        """Where the members' records live; in a private swarm a non-member cannot even name it."""
        if self.swarm_key is None:
            return f"{swarm}.peers"
        return f"{swarm}.{self._mac(b'records', swarm.encode()).hex()[:32]}.peers"

    def record_proof(self, peer: PeerId) -> str:
        return self._mac(b"member", peer.encode()).hex() if self.swarm_key else ""

    def admits_record(self, peer: PeerId, proof: object) -> bool:
        if not self.admits_peer(peer):
            return False
        return self.swarm_key is None or (isinstance(proof, str) and hmac.compare_digest(proof, self.record_proof(peer)))

    def admits_peer(self, peer: PeerId) -> bool:
        return self.allowed is None or peer in self.allowed

    def stream_proof(self, sender: PeerId, receiver: PeerId, now: float | None = None) -> bytes:
        """What a sender writes first on every stream of a private swarm (nothing in a public one)."""
        if self.swarm_key is None:
            return b""
        stamp = _STAMP.pack(time.time() if now is None else now)
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return stamp + nonce + self._mac(b"stream", sender.encode(), receiver.encode(), stamp, nonce)

    def _mac(self, *parts: bytes) -> bytes:
        assert self.swarm_key is not None
        # Length-prefixed, so that no two different part lists give the same message.
        message = b"".join(struct.pack(">I", len(p)) + p for p in parts)
        return hmac.new(self.swarm_key, message, hashlib.sha256).digest()


PUBLIC = Access()


class StreamProofs:
    """Checks the proof that opens each incoming stream, and remembers nonces against replay.

    A nonce is remembered until its proof's stamp is too old to be accepted, so a replay is
    refused as ``replayed`` for as long as it would otherwise pass.
    """

    def __init__(self, access: Access, me: PeerId):
        self.access = access
        self.me = me
        self._nonces: set[bytes] = set()
        self._expiries: list[tuple[float, bytes]] = []  # a heap: the nonce to forget first on top

    def check(self, sender: PeerId, proof: bytes, now: float | None = None) -> str | None:
        """None when the proof holds; otherwise the reason to count: not-member, stale-proof, replayed, over-capacity."""
        now = time.time() if now is None else now
        if len(proof) != STREAM_PROOF_BYTES or self.access.swarm_key is None:
            return "not-member"
        stamp = proof[: _STAMP.size]
        nonce = proof[_STAMP.size : _STAMP.size + _NONCE_BYTES]
        mac = proof[_STAMP.size + _NONCE_BYTES :]
        if not hmac.compare_digest(mac, self.access._mac(b"stream", sender.encode(), self.me.encode(), stamp, nonce)):
            return "not-member"
        (sent,) = _STAMP.unpack(stamp)
        if not now - PROOF_WINDOW_SECONDS <= sent <= now + PROOF_FUTURE_SECONDS:  # NaN fails this too
            return "stale-proof"
        self._forget_expired(now)
        if nonce in self._nonces:
            return "replayed"
        if len(self._nonces) >= MAX_REMEMBERED_NONCES:
            return "over-capacity"
        self._nonces.add(nonce)
        heapq.heappush(self._expiries, (sent + PROOF_WINDOW_SECONDS, nonce))
        return None

    def _forget_expired(self, now: float) -> None:
        """Forget the nonces of proofs whose stamps are too old to be accepted any more."""
        while self._expiries and self._expiries[0][0] < now:
            self._nonces.remove(heapq.heappop(self._expiries)[1])
