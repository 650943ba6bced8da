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

Outgoing, a sender keeps each stream open until its receiver has closed it, that is, has read the
message (the p2p daemons may drop what a stream still carries when its sender closes it first),
and opens no more streams to one peer at once than ``StreamLimits.streams_to_peer``: however fast
it sends, and however busy the receiver, an honest sender stays within what the receiver admits.
A message whose writing has begun is written to the end even if the caller stops waiting for it.
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
    Limits,
    StreamCut,
    StreamEnded,
    WireError,
    read_header_body,
    read_header_length,
    read_message,
    read_payload,
    write_message,
)
from peer.config import RunConfig
from peer.net.access import PUBLIC, STREAM_PROOF_BYTES, Access, StreamProofs
from peer.net.stream_limits import ByteBudget, Offenders, OpenStreams, StreamLimits, Waiters

log = logging.getLogger(__name__)

PROTOCOL = "gossip-peer/1"
CONNECT_TIMEOUT = 10.0
LINGER_TIMEOUT = 30.0  # how long a reply's stream stays open for the requester to read it
# Seconds between two checks of a stream's peer that is not known to be a member yet (each check of
# the swarm's records waits for a fresh reading of them, at most one a second).
ADMISSION_RETRY_SECONDS = 0.5
MAX_COUNTED_PEERS = 1024  # peers whose failed dials are counted one by one, and that we remember connecting to
# Served by every transport, whatever its protocol: a peer that answers has admitted our stream, so
# it has read our membership record, and we have reached it (see ``reach``).
REACH = "transport-reach"
REACH_TIMEOUT = 10.0
# A stream cut short whose sender is no longer connected to us went away (it stopped or crashed)
# halfway: a broken stream, not a malformed message. Its connection may take a moment to go.
GONE_CHECKS = 4
GONE_CHECK_INTERVAL = 0.25
# How long stop() lets the messages being delivered reach their receivers.
STOP_DELIVERIES_TIMEOUT = 3.0


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
        self._queued: Counter[PeerId] = Counter()  # members' streams waiting for room among their open ones
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
        # Streams we opened that their receiver has not closed yet, by peer, and who waits for room.
        self._outgoing: Counter[PeerId] = Counter()
        self._outgoing_room = Waiters()
        self._deliveries: set[asyncio.Task] = set()  # messages written or being written, until their receiver closes
        self.reached: set[PeerId] = set()  # peers that answered our REACH, or whose REACH we answered
        self.broken_streams = 0  # incoming streams that broke, ended empty, or were cut short by a sender that went away
        self._handlers[REACH] = self._on_reach

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(PROTOCOL, self._on_stream)

    async def stop(self) -> None:
        """Stop serving, and give the messages on their way a moment to be read before the daemon goes."""
        await self.p2p.remove_binary_stream_handler(PROTOCOL)
        await self.settle()

    async def settle(self, timeout: float = STOP_DELIVERIES_TIMEOUT) -> None:
        """Wait until the receivers of the messages on their way have read them, for at most
        ``timeout`` seconds; those still on their way then are cut short."""
        if not self._deliveries:
            return
        pending = set(self._deliveries)
        _, late = await asyncio.wait(pending, timeout=timeout)
        for delivery in late:
            delivery.cancel()
        if late:
            await asyncio.wait(late)

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

    def outgoing(self, peer: PeerId) -> int:
        """Streams we opened to ``peer`` that it has not closed yet."""
        return self._outgoing[peer]

    async def _open(self, peer: PeerId) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream to ``peer``, once fewer than ``streams_to_peer`` of ours to it are open; the
        caller closes it and then calls ``_closed(peer)``."""
        cap = self.stream_limits.streams_to_peer
        await self._outgoing_room.until(lambda: self._outgoing[peer] < cap)
        self._outgoing[peer] += 1
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await self._introduce(peer)
                _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer), PROTOCOL)
        except BaseException as error:
            self._closed(peer)
            if not isinstance(error, Exception):
                raise
            # The daemon reports a refused or failed dial as a generic error.
            self._introduced.discard(peer)  # next time, at the addresses its record announces then
            if len(self.failed_dials) < MAX_COUNTED_PEERS or peer in self.failed_dials:
                self.failed_dials[peer] += 1
            raise PeerUnreachable(f"cannot open a stream to {peer}: {error!r}") from error
        writer.write(self.access.stream_proof(self.peer_id, peer))  # sent with the message that follows
        return reader, writer

    def _closed(self, peer: PeerId) -> None:
        self._outgoing[peer] -= 1
        if not self._outgoing[peer]:
            del self._outgoing[peer]
        self._outgoing_room.wake()

    async def _write(self, writer: asyncio.StreamWriter, message: Message) -> None:
        sent = await write_message(writer, message)
        self.counters.bytes_sent += sent
        self.counters.messages_sent += 1

    def delivery_deadline(self, size: int) -> float:
        """Seconds a receiver with our limits may take to read a message with a ``size``-byte
        payload: waiting for admission (its peer's record, then room among its streams), its
        header, then its payload."""
        return 3 * self.stream_limits.header_timeout + self.payload_deadline(size)

    async def send(self, peer: PeerId, message: Message) -> None:
        """Returns once the message is written. The stream stays open, in the background, until the
        receiver has read the message and closed it (or its deadline has passed), and the message is
        written to the end even if the caller stops waiting for it halfway: it is not cut short."""
        reader, writer = await self._open(peer)
        writing = asyncio.ensure_future(self._write(writer, message))
        self._leave_to_receiver(peer, reader, writer, writing, message)
        try:
            await asyncio.shield(writing)
        except (ConnectionError, OSError) as error:
            raise PeerUnreachable(f"lost the stream to {peer}: {error!r}") from error

    async def request(self, peer: PeerId, message: Message, timeout: float) -> Message:
        async with asyncio.timeout(timeout):
            reader, writer = await self._open(peer)
            writing = asyncio.ensure_future(self._write(writer, message))
            try:
                await asyncio.shield(writing)
            except asyncio.CancelledError:  # the timeout, halfway through: the request is still written whole
                self._leave_to_receiver(peer, reader, writer, writing, message)
                raise
            except (ConnectionError, OSError) as error:
                writer.close()
                self._closed(peer)
                raise PeerUnreachable(f"lost the stream to {peer}: {error!r}") from error
            try:
                reply = await read_message(reader, self.limits)
            except StreamCut as reason:
                if await self._went_away(peer):  # it stopped or crashed before its reply was whole
                    raise PeerUnreachable(f"{peer} went away while replying: {reason}") from reason
                self.counters.reject("malformed")
                raise PeerUnreachable(f"{peer} sent a malformed reply: {reason}") from reason
            except WireError as reason:
                self.counters.reject("malformed")
                raise PeerUnreachable(f"{peer} sent a malformed reply: {reason}") from reason
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as error:
                raise PeerUnreachable(f"lost the stream to {peer}: {error!r}") from error
            finally:
                writer.close()
                self._closed(peer)
        self.counters.bytes_received += reply.wire_size()
        self.counters.messages_received += 1
        return reply

    def _leave_to_receiver(
        self, peer: PeerId, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, writing: asyncio.Task,
        message: Message,
    ) -> None:
        """Close the stream, and free its place among ours to ``peer``, once ``writing`` is done and
        the receiver has read the message: it has closed the stream, or answered on it (a request's
        reply, which nobody waits for any more), or its deadline has passed. Until then the stream
        is one of the deliveries that ``settle`` waits for."""
        deadline = self.delivery_deadline(sum(t.nbytes for t in message.tensors.values()))

        async def deliver() -> None:
            try:
                await writing
            except (ConnectionError, OSError):
                return  # the caller, if it still waits, hears of it
            await self._until_read(reader, deadline)

        def delivered(delivery: asyncio.Task) -> None:
            self._deliveries.discard(delivery)
            writer.close()
            self._closed(peer)

        delivery = asyncio.ensure_future(deliver())
        self._deliveries.add(delivery)
        delivery.add_done_callback(delivered)

    async def reach(self, peer: PeerId, timeout: float = REACH_TIMEOUT) -> bool:
        """Whether ``peer`` answers us: we can open streams to it, and it admits them, so it has
        read our membership record. Remembered in ``reached``."""
        try:
            reply = await self.request(peer, Message(REACH, self.peer_id, 0), timeout)
        except (TimeoutError, PeerUnreachable) as reason:
            log.info("could not reach %s: %r", peer, reason)
            return False
        if reply.kind != REACH or reply.sender != peer:
            return False
        self._note_reached(peer)
        return True

    async def _on_reach(self, message: Message) -> Message:
        self._note_reached(message.sender)  # admitted, and its stream came through: it reached us
        return Message(REACH, self.peer_id, 0)

    def _note_reached(self, peer: PeerId) -> None:
        if len(self.reached) < MAX_COUNTED_PEERS:
            self.reached.add(peer)

    async def _linger(self, reader: asyncio.StreamReader) -> None:
        """Wait until the requester has read the reply and closed its side.

        Closing right after writing lets the daemon drop a reply it has not forwarded yet (seen
        on loopback about once in a thousand requests); whatever a requester sends after its
        request is discarded.
        """
        await self._until_closed(reader, LINGER_TIMEOUT)

    @staticmethod
    async def _until_closed(reader: asyncio.StreamReader, timeout: float) -> None:
        """Wait until the other end has closed the stream, for at most ``timeout`` seconds: what we
        wrote has been read by then. The daemons may drop what a stream still carries once its
        writer closes it (the writer's daemon resets the stream when the writer closes it, and the
        reader's daemon drops what it has not handed on yet): a message would arrive cut short, or
        empty. Whatever the other end sends meanwhile is discarded."""
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            async with asyncio.timeout(timeout):
                while await reader.read(1 << 16):
                    pass

    @staticmethod
    async def _until_read(reader: asyncio.StreamReader, timeout: float) -> None:
        """Wait until the other end has closed the stream or sent something on it, which it does
        only once it has read what we wrote (see ``_until_closed``), for at most ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            async with asyncio.timeout(timeout):
                await reader.read(1 << 16)

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
        try:
            await self._admit_and_serve(remote, reader, writer)
        except asyncio.CancelledError:
            # This peer is stopping: its event loop cancels what is left. Nothing to report.
            writer.close()

    async def _admit_and_serve(self, remote: PeerId, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
        if not await self._has_room(remote, writer):
            return
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
        total = self.open_streams.total + self._unverified.total() + self._queued.total()
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
        ``max_unverified_per_peer`` of them, and then take their turns among them (``_has_room``),
        so that a burst from a member we cannot place yet is not refused as over capacity, and a
        stranger holds no more than that, for no longer."""
        if self._unverified[remote] >= self.stream_limits.max_unverified_per_peer:
            detail = f"{self._unverified[remote]} of its streams wait for its membership already"
            self._refuse(writer, remote, "not-member", detail, strike=False)
            return False
        self._unverified[remote] += 1
        detail = "it has no membership record in this swarm"  # what the deadline ends, unless found
        try:
            async with asyncio.timeout(self.stream_limits.header_timeout):
                while not await self.admits(remote):
                    await asyncio.sleep(ADMISSION_RETRY_SECONDS)
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

    async def _has_room(self, remote: PeerId, writer: asyncio.StreamWriter) -> bool:
        """Whether a member's stream finds room among its open streams, where it is then counted;
        the stream is refused otherwise, before anything is read from it.

        A stream past the cap waits for room, apart from them, until the header's deadline: an
        honest sender's burst that we have not read yet (our event loop was busy) is read late,
        not refused. A stream that finds no room in time is refused without a strike (its peer's
        open streams answer for themselves at their deadlines); one past ``max_waiting_per_peer``
        streams waiting is refused with one: no honest sender opens that many at once."""
        if not self.open_streams.full_for(remote):
            self.open_streams.open(remote)
            return True
        if self._queued[remote] >= self.stream_limits.max_waiting_per_peer:
            detail = f"{self.open_streams.of(remote)} streams from this peer are open and {self._queued[remote]} wait already"
            self._refuse(writer, remote, "over-capacity", detail)
            return False
        self._queued[remote] += 1
        try:
            async with asyncio.timeout(self.stream_limits.header_timeout):
                await self.open_streams.room_for(remote)
        except TimeoutError:
            detail = f"no room among its {self.open_streams.of(remote)} open streams in time"
            self._refuse(writer, remote, "over-capacity", detail, strike=False)
            return False
        finally:
            self._queued[remote] -= 1
            if not self._queued[remote]:
                del self._queued[remote]
        self.open_streams.open(remote)
        return True

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
                try:
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
                except StreamCut as cut:
                    # A sender that stopped or crashed halfway is gone from our connections; one still
                    # connected cut its own message short, or announced more than it sent. Told apart
                    # while its bytes are still reserved, so that streams waiting for them come after.
                    if isinstance(cut, StreamEnded) or not await self._went_away(remote):
                        raise
                    log.info("a stream from %s broke: %s, and its sender went away", remote, cut)
                    self.broken_streams += 1
                    writer.close()
        except StreamEnded:
            # Nothing to refuse, like a stream that broke: its sender gave up before writing, or
            # closed it so soon that the daemons dropped what it carried.
            log.info("a stream from %s ended before its first byte", remote)
            self.broken_streams += 1
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
            self.broken_streams += 1
            writer.close()
        return None

    async def _went_away(self, peer: PeerId) -> bool:
        """Whether our daemon is no longer connected to ``peer``, within a moment (its connection
        may close just after its streams do)."""
        for check in range(GONE_CHECKS):
            if check:
                await asyncio.sleep(GONE_CHECK_INTERVAL)
            try:
                connected = await self.p2p.list_peers()
            except Exception:  # noqa: BLE001 - unknown: held against the stream as before
                return False
            if all(info.peer_id.to_base58() != peer for info in connected):
                return True
        return False

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
