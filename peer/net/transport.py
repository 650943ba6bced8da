"""Transport over libp2p streams (hivemind's P2P): one stream per message, or per request and reply.

The sender of every incoming message is the peer that libp2p authenticated for the stream;
a message that claims another sender is rejected, like any malformed one, before a protocol
sees it. What incoming streams may cost, whoever opens them, is bounded by ``StreamLimits``
(peer.net.stream_limits): a stream past the caps, or from a peer ignored for its refused
messages, is closed before anything is read from it. In a private swarm (``Access``, see
peer.net.access) every stream opens with a proof of the swarm key, checked before the message's
header is read, and with a list of allowed peers, any other peer's stream is closed at once.
Then the transport's admission (``admits``: the swarm's membership records) must hold for the
stream's peer, whatever the message's kind: libp2p names the peer when the stream opens, so
nothing of a stranger's message is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable

from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

from gossip.message import Message, PeerId
from gossip.transport import Admission, Handler, PeerUnreachable, TrafficCounters, Transport, admit_everyone
from gossip.wire import (
    Limits, StreamEnded, WireError, read_header_body, read_header_length, read_message, read_payload, write_message,
)
from peer.config import RunConfig
from peer.net.access import PUBLIC, STREAM_PROOF_BYTES, Access, StreamProofs
from peer.net.stream_limits import ByteBudget, Offenders, OpenStreams, StreamLimits

log = logging.getLogger(__name__)

PROTOCOL = "gossip-peer/1"
CONNECT_TIMEOUT = 10.0
LINGER_TIMEOUT = 30.0  # how long a reply's stream stays open for the requester to read it
# Seconds between two checks of a stream's peer that is not known to be a member yet (each check of
# the swarm's records waits for a fresh reading of them, at most one a second).
ADMISSION_RETRY_SECONDS = 0.5
MAX_COUNTED_PEERS = 1024  # peers whose failed dials are counted one by one, and that we remember connecting to


class P2PTransport(Transport):
    def __init__(
        self,
        p2p: P2P,
        limits: Limits,
        reachable: Callable[[], list[PeerId]] | None = None,
        stream_limits: StreamLimits | None = None,
        access: Access = PUBLIC,
        addresses: Callable[[PeerId], list[str]] | None = None,
        admits: Admission = admit_everyone,
        exchange_timeout: float = RunConfig.model_fields["exchange_timeout"].default,
    ):
        """``admits`` is the swarm's admission, asked of every incoming stream's peer (by default
        everyone is a member: a transport without membership records, in a test or a benchmark).
        ``exchange_timeout`` is how long the peer's protocol waits for a neighbour's model: no
        payload's deadline is longer, as a model that comes later is of no use to the exchange."""
        self.p2p = p2p
        self.peer_id = p2p.peer_id.to_base58()
        self.access = access
        self.proofs = StreamProofs(access, self.peer_id)
        self.admits = admits
        self.limits = limits
        self.stream_limits = stream_limits or StreamLimits()
        self.exchange_timeout = exchange_timeout
        self.counters = TrafficCounters()
        self.open_streams = OpenStreams(self.stream_limits)
        self._unverified: Counter[PeerId] = Counter()  # streams waiting for their peer's admission, by peer
        largest_message = limits.max_header_bytes + limits.max_payload_bytes
        self.buffered = ByteBudget(
            self.stream_limits.buffered_messages * largest_message,
            share=self.stream_limits.buffered_messages_per_sender * largest_message,
        )
        self.offenders = Offenders(self.stream_limits)
        self._handlers: dict[str, Handler] = {}
        self._reachable = reachable or list
        self.failed_dials: Counter[PeerId] = Counter()  # streams we could not open, by peer
        self._addresses = addresses or (lambda peer: [])
        self._introduced: set[PeerId] = set()  # peers whose announced addresses our daemon was given

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(PROTOCOL, self._on_stream)

    async def stop(self) -> None:
        await self.p2p.remove_binary_stream_handler(PROTOCOL)

    def serve(self, kind: str, handler: Handler) -> None:
        if kind in self._handlers:
            raise ValueError(f"messages of kind {kind!r} are served already; each kind has one handler")
        self._handlers[kind] = handler

    def reachable(self) -> list[PeerId]:
        return [peer for peer in self._reachable() if peer != self.peer_id]

    async def _introduce(self, peer: PeerId) -> None:
        """Connect to a peer at the addresses its membership record announces, the first time we
        open a stream to it: the daemon need not look it up in its DHT first (slow, or stuck, for
        a peer in client mode that met only its bootstrap peers). A failure here is reported by
        the stream that follows."""
        if peer in self._introduced:
            return
        announced = self._addresses(peer)
        if not announced:
            return
        if len(self._introduced) >= MAX_COUNTED_PEERS:
            self._introduced.clear()  # at worst, a peer is connected to once more
        self._introduced.add(peer)
        with contextlib.suppress(Exception):
            await self.p2p._client.connect(PeerID.from_base58(peer), [Multiaddr(a) for a in announced])

    async def _open(self, peer: PeerId) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await self._introduce(peer)
                _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer), PROTOCOL)
        except Exception as error:  # the daemon reports a refused or failed dial as a generic error
            self._introduced.discard(peer)  # next time, at the addresses its record announces then
            if len(self.failed_dials) < MAX_COUNTED_PEERS or peer in self.failed_dials:
                self.failed_dials[peer] += 1
            raise PeerUnreachable(f"cannot open a stream to {peer}: {error!r}") from error
        writer.write(self.access.stream_proof(self.peer_id, peer))  # sent with the message that follows
        return reader, writer

    async def _write(self, writer: asyncio.StreamWriter, message: Message) -> None:
        sent = await write_message(writer, message)
        self.counters.bytes_sent += sent
        self.counters.messages_sent += 1

    async def send(self, peer: PeerId, message: Message) -> None:
        _, writer = await self._open(peer)
        try:
            await self._write(writer, message)
        except (ConnectionError, OSError) as error:
            raise PeerUnreachable(f"lost the stream to {peer}: {error!r}") from error
        finally:
            writer.close()

    async def request(self, peer: PeerId, message: Message, timeout: float) -> Message:
        async with asyncio.timeout(timeout):
            reader, writer = await self._open(peer)
            try:
                await self._write(writer, message)
                reply = await read_message(reader, self.limits)
            except WireError as reason:
                self.counters.reject("malformed")
                raise PeerUnreachable(f"{peer} sent a malformed reply: {reason}") from reason
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as error:
                raise PeerUnreachable(f"lost the stream to {peer}: {error!r}") from error
            finally:
                writer.close()
        self.counters.bytes_received += reply.wire_size()
        self.counters.messages_received += 1
        return reply

    async def _linger(self, reader: asyncio.StreamReader) -> None:
        """Wait until the requester has read the reply and closed its side.

        Closing right after writing lets the daemon drop a reply it has not forwarded yet (seen
        on loopback about once in a thousand requests); whatever a requester sends after its
        request is discarded.
        """
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            async with asyncio.timeout(LINGER_TIMEOUT):
                while await reader.read(1 << 16):
                    pass

    def _refuse(self, writer: asyncio.StreamWriter, remote: PeerId, reason: str, detail: str, strike: bool = True) -> None:
        """Close a stream we will not serve. A refusal the peer is to blame for is a warning and counts
        towards ignoring it, so that a peer's warnings stop after a few; others are only noted."""
        self.counters.reject(reason)
        log.log(logging.WARNING if strike else logging.INFO, "rejected a message from %s (%s): %s", remote, reason, detail)
        writer.close()
        if strike and self.offenders.strike(remote):
            limits = self.stream_limits
            log.warning(
                "ignoring %s for %g s: %d refused streams within %g s",
                remote, limits.ignore_for, limits.strikes, limits.strike_window,
            )

    async def _on_stream(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        remote = info.peer_id.to_base58()
        # Each stream is its own task, but they all share this event loop with the daemon's accept
        # path: a flood from an ignored peer is closed here without reading or logging.
        if self.offenders.ignored(remote):
            self.counters.reject("ignored")
            writer.close()
            return
        if not self.access.admits_peer(remote):
            self._refuse(writer, remote, "not-member", "it is not in the list of allowed peers")
            return
        if self._all_full(writer, remote) or not await self._is_member(remote, writer):
            return
        if self.open_streams.full_for(remote):
            detail = f"{self.open_streams.of(remote)} streams from this peer are open already"
            self._refuse(writer, remote, "over-capacity", detail)
            return
        if self._all_full(writer, remote):
            return
        self.open_streams.open(remote)
        try:
            # Admitted: the peer is a member and not ignored, its stream is within the caps, and
            # nothing has been read from it yet.
            if await self._proves_swarm_key(remote, reader, writer):
                await self._serve_stream(remote, reader, writer)
        finally:
            self.open_streams.close(remote)

    def _all_full(self, writer: asyncio.StreamWriter, remote: PeerId) -> bool:
        """Whether the incoming streams, admitted and waiting for admission, fill the cap; the stream
        is then refused. Not the peer's fault, so no strike: the streams filling the cap may be others'."""
        total = self.open_streams.total + self._unverified.total()
        if total < self.stream_limits.max_streams:
            return False
        self._refuse(writer, remote, "over-capacity", f"{total} incoming streams are open already", strike=False)
        return True

    async def _is_member(self, remote: PeerId, writer: asyncio.StreamWriter) -> bool:
        """Whether the transport's admission holds for the stream's peer; the stream is refused
        otherwise, before anything is read from it, with no strike: a member whose record we have
        not read yet must not end up ignored.

        A peer we have no record of may be a newcomer, or a member whose record our readings have
        missed so far (a DHT node that missed its store), so its streams wait for readings until
        the header's deadline. They wait apart from its admitted streams, at most
        ``max_unverified_per_peer`` of them, and then for room among them, so that a burst from a
        member we cannot place yet is not refused as over capacity, and a stranger holds no more
        than that, for no longer."""
        if self._unverified[remote] >= self.stream_limits.max_unverified_per_peer:
            detail = f"{self._unverified[remote]} of its streams wait for its membership already"
            self._refuse(writer, remote, "not-member", detail, strike=False)
            return False
        self._unverified[remote] += 1
        detail = "it has no membership record in this swarm"  # what the deadline ends, unless found
        try:
            async with asyncio.timeout(self.stream_limits.header_timeout):
                if await self.admits(remote):
                    return True
                while not await self.admits(remote):
                    await asyncio.sleep(ADMISSION_RETRY_SECONDS)
                detail = "no room among its open streams in time"
                # Found at last: its streams that waited take their turns among its admitted ones.
                await self.open_streams.room_for(remote)
                return True
        except TimeoutError:
            pass
        except Exception as error:  # a failed read of the records must not leave the stream open
            detail = f"its membership could not be checked: {error!r}"
        finally:
            self._unverified[remote] -= 1
            if not self._unverified[remote]:
                del self._unverified[remote]
        self._refuse(writer, remote, "not-member", detail, strike=False)
        return False

    async def _proves_swarm_key(self, remote: PeerId, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """In a private swarm, whether the stream opens with a valid proof of the swarm key; the
        stream is refused otherwise. A public swarm asks for none."""
        if not self.access.private:
            return True
        try:
            async with asyncio.timeout(self.stream_limits.header_timeout):
                proof = await reader.readexactly(STREAM_PROOF_BYTES)
        except TimeoutError:
            self._refuse(writer, remote, "too-slow", "its proof of the swarm key did not arrive in time")
            return False
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as error:
            self._refuse(writer, remote, "not-member", f"the stream ended before a proof of the swarm key: {error!r}")
            return False
        reason = self.proofs.check(remote, proof)
        if reason is not None:
            self._refuse(writer, remote, reason, "no valid proof of the swarm key", strike=reason != "over-capacity")
            return False
        return True

    def payload_deadline(self, size: int) -> float:
        """Seconds a payload of ``size`` bytes may take from its header, waiting for room included."""
        return min(self.stream_limits.payload_timeout(size), self.exchange_timeout)

    async def _read(self, remote: PeerId, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Message | None:
        """The stream's message, or None once the stream has been refused or has broken.

        The header's bytes, then the payload's, are reserved from the sender's share of the budget
        of buffered bytes before they are read; both stay reserved until the message is read."""
        limits = self.stream_limits
        # What a deadline that passes was waiting for: bytes from the sender, or room for ``waiting``.
        late, waiting = "its header", 0
        try:
            async with contextlib.AsyncExitStack() as reserved:
                async with asyncio.timeout(limits.header_timeout):
                    length = waiting = await read_header_length(reader, self.limits)
                    await reserved.enter_async_context(self.buffered.reserve(remote, length))
                    waiting = 0
                    header = await read_header_body(reader, length, self.limits)
                size = waiting = header.payload_size
                late = f"its {size}-byte payload"
                # A sender that stops halfway must not hold this task and its buffer for ever.
                async with asyncio.timeout(self.payload_deadline(size)):
                    await reserved.enter_async_context(self.buffered.reserve(remote, size))
                    waiting = 0
                    return await read_payload(reader, header)
        except StreamEnded:
            # Nothing to refuse, like a stream that broke: its sender gave up before writing.
            log.info("a stream from %s ended before its first byte", remote)
            writer.close()
        except WireError as reason:
            self._refuse(writer, remote, "malformed", str(reason))
        except TimeoutError:
            if waiting:
                self._refuse_for_room(remote, writer, waiting)
            else:
                self._refuse(writer, remote, "too-slow", f"{late} did not arrive in time")
        except (ConnectionError, OSError) as error:
            log.info("stream from %s broke: %r", remote, error)
            writer.close()
        return None

    def _refuse_for_room(self, remote: PeerId, writer: asyncio.StreamWriter, size: int) -> None:
        """Refuse a stream that found no room for ``size`` more bytes in time: the peer's fault
        when its own streams hold its share, not when others hold the rest of the budget."""
        if not self.buffered.within_share(remote, size):
            detail = f"its streams hold their share of buffered bytes; no room for {size} more"
            self._refuse(writer, remote, "over-capacity", detail)
        else:
            detail = f"no room for {size} bytes in the budget of buffered bytes"
            self._refuse(writer, remote, "over-capacity", detail, strike=False)

    async def _serve_stream(self, remote: PeerId, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        message = await self._read(remote, reader, writer)
        if message is None:
            return
        if message.sender != remote:
            self._refuse(writer, remote, "wrong-sender", f"sender field {message.sender!r} is not the stream's peer")
            return
        handler = self._handlers.get(message.kind)
        if handler is None:
            self._refuse(writer, remote, "unknown-kind", f"no handler for message kind {message.kind!r}")
            return
        self.counters.bytes_received += message.wire_size()
        self.counters.messages_received += 1
        try:
            reply = await handler(message)
            if reply is not None:
                await self._write(writer, reply)
                await self._linger(reader)
        except (ConnectionError, OSError) as error:
            log.info("could not answer %s: %r", remote, error)
        except Exception:
            log.exception("the %r handler failed on a message from %s", message.kind, remote)
        finally:
            writer.close()
