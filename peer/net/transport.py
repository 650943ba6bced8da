"""Transport over libp2p streams (hivemind's P2P): one stream per message, or per request and reply.

The sender of every incoming message is the peer that libp2p authenticated for the stream;
a message that claims another sender is rejected, like any malformed one, before a protocol
sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from hivemind.p2p import P2P, PeerID

from gossip.message import Message, PeerId
from gossip.transport import Handler, PeerUnreachable, TrafficCounters, Transport
from gossip.wire import Limits, WireError, read_message, write_message

log = logging.getLogger(__name__)

PROTOCOL = "gossip-peer/1"
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 300.0  # generous: a 1 GB model over a slow link still arrives
LINGER_TIMEOUT = 30.0  # how long a reply's stream stays open for the requester to read it


class P2PTransport(Transport):
    def __init__(self, p2p: P2P, limits: Limits, reachable: Callable[[], list[PeerId]] | None = None):
        self.p2p = p2p
        self.peer_id = p2p.peer_id.to_base58()
        self.limits = limits
        self.counters = TrafficCounters()
        self._handlers: dict[str, Handler] = {}
        self._reachable = reachable or (lambda: [])

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(PROTOCOL, self._on_stream)

    async def stop(self) -> None:
        await self.p2p.remove_binary_stream_handler(PROTOCOL)

    def serve(self, kind: str, handler: Handler) -> None:
        self._handlers[kind] = handler

    def reachable(self) -> list[PeerId]:
        return [peer for peer in self._reachable() if peer != self.peer_id]

    async def _open(self, peer: PeerId) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer), PROTOCOL)
        except Exception as error:  # the daemon reports a refused or failed dial as a generic error
            raise PeerUnreachable(f"cannot open a stream to {peer}: {error!r}") from error
        return reader, writer

    async def _write(self, writer: asyncio.StreamWriter, message: Message) -> None:
        sent = await write_message(writer, message)
        self.counters.bytes_sent += sent
        self.counters.messages_sent += 1

    async def send(self, peer: PeerId, message: Message) -> None:
        reader, writer = await self._open(peer)
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

    def _refuse(self, writer: asyncio.StreamWriter, remote: PeerId, reason: str, detail: str) -> None:
        self.counters.reject(reason)
        log.warning("rejected a message from %s (%s): %s", remote, reason, detail)
        writer.close()

    async def _on_stream(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        remote = info.peer_id.to_base58()
        try:
            # A sender that stops halfway must not hold this task and its buffer for ever.
            async with asyncio.timeout(READ_TIMEOUT):
                message = await read_message(reader, self.limits)
        except WireError as reason:
            self._refuse(writer, remote, "malformed", str(reason))
            return
        except (ConnectionError, OSError, asyncio.IncompleteReadError, TimeoutError) as error:
            log.info("stream from %s broke: %r", remote, error)
            writer.close()
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
