"""Dial-back: a peer asks another to connect to it, to learn whether others can reach it.

`peer doctor` needs a view of its host from outside: can peers open a TCP connection to the ports
it would announce, do the swarm's peers take its swarm key, do the clocks agree, which version
runs there. Every peer that accepts connections serves this on a libp2p protocol of its own.

A request names up to ``MAX_PORTS`` ports (or multiaddrs, of which only the port counts). The
server connects to each at the IP address that the request's stream came from, as the daemon saw
the connection, never at an address the request names: nobody can make a peer connect to a third
party. A stream whose address is unknown or relayed is refused. The answer gives, per port, whether
the connection opened or why not, and the server's wall-clock time, version and whether its swarm
is private: nothing secret.

What a stranger can cost a server is bounded: a request of at most ``MAX_REQUEST_BYTES``, one
request per requesting peer per ``REQUEST_INTERVAL`` seconds, ``MAX_SERVING`` requests served at
once, and a deadline on every wait. In a private swarm a request must carry the proof of the
swarm key that opens the transport's streams (``Access.stream_proof``); without a valid one the
answer is ``swarm-key`` and nothing else is done, which tells the requester only that its key is
not the swarm's.

    request: [4-byte big-endian length][msgpack {"ports": [port or multiaddr, ...], "proof": bytes}]
    answer:  [4-byte big-endian length][msgpack {"status", "time", "version", "private", "ports": [
              {"port", "address", "error"}, ...]}]
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import itertools
import math
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata

import msgpack
from hivemind.p2p import P2P, PeerID

from gossip.message import PeerId
from peer.net.access import PUBLIC, STREAM_PROOF_BYTES, Access, StreamProofs

PROTOCOL = "gossip-peer-dialback/1"
MAX_PORTS = 4
MAX_REQUEST_BYTES = 1024
MAX_ANSWER_BYTES = 4096
DIAL_TIMEOUT = 3.0
READ_TIMEOUT = 5.0  # for a request to arrive once its stream is open
LINGER_TIMEOUT = 5.0  # for the requester to read the answer and close its side
REQUEST_INTERVAL = 5.0  # seconds between two requests of one peer that are served
MAX_SERVING = 4
MAX_REMEMBERED_PEERS = 4096
_MAX_TEXT = 120  # characters of any text an answer carries
_LENGTH = struct.Struct(">I")

OK = "ok"
WRONG_KEY = "swarm-key"  # no valid proof of the swarm key: missing, for another key, another receiver
STALE_PROOF = "stale-proof"  # a valid proof whose time the server's clock does not accept
TOO_SOON = "too-soon"
BUSY = "busy"
TOO_LARGE = "too-large"
MALFORMED = "malformed"
NO_ADDRESS = "no-address"  # the stream's address is unknown or relayed: nowhere to dial safely
STATUSES = (OK, WRONG_KEY, STALE_PROOF, TOO_SOON, BUSY, TOO_LARGE, MALFORMED, NO_ADDRESS)


@functools.cache
def package_version() -> str:
    try:
        return metadata.version("gossip-peer")
    except metadata.PackageNotFoundError:
        return "unknown"


Dial = Callable[[str, int, float], Awaitable[str | None]]


async def tcp_dial(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to ``host``:``port`` opens within ``timeout`` s, else why not."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return "timed out"
    except ConnectionRefusedError:
        return "connection refused"
    except OSError as error:
        return (error.strerror or type(error).__name__).lower()
    writer.close()
    return None


def stream_ip(address: object) -> str | None:
    """The IP address of a stream's remote end, from the multiaddr the daemon gives for it; None
    when it names none, or a relay (whose address is a third party's)."""
    parts = str(address).split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6") or "p2p-circuit" in parts:
        return None
    try:
        return str(ipaddress.ip_address(parts[2]))
    except ValueError:
        return None


def tcp_multiaddr(ip: str, port: int) -> str:
    return f"/{'ip6' if ':' in ip else 'ip4'}/{ip}/tcp/{port}"


def requested_port(item: object) -> int | None:
    """The TCP port a request names: a port number, or the /tcp/ part of a multiaddr."""
    if isinstance(item, str):
        parts = item.split("/")
        numbers = [p for name, p in itertools.pairwise(parts) if name == "tcp" and p.isascii() and p.isdigit()]
        numbers = [p for p in numbers if len(p) <= 5]  # a long digit string would make a huge int
        item = int(numbers[0]) if numbers else None
    if isinstance(item, int) and not isinstance(item, bool) and 1 <= item <= 65535:
        return item
    return None


def _frame(value: dict) -> bytes:
    body = msgpack.packb(value, use_bin_type=True)
    return _LENGTH.pack(len(body)) + body


class FrameError(ValueError):
    """Not a frame: truncated, or not a msgpack map."""


class FrameTooLarge(FrameError):
    """A frame whose length prefix announces more than is allowed; nothing more of it is read."""


async def _read_frame(reader: asyncio.StreamReader, max_bytes: int) -> dict:
    """One length-prefixed msgpack map of at most ``max_bytes``, checked before it is read."""
    try:
        (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        if length > max_bytes:
            raise FrameTooLarge(f"{length} bytes, more than {max_bytes}")
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as error:
        raise FrameError(f"truncated after {len(error.partial)} bytes") from None
    try:
        value = msgpack.unpackb(
            body, raw=False, strict_map_key=True, max_str_len=max_bytes, max_bin_len=max_bytes,
            max_ext_len=0, max_array_len=2 * MAX_PORTS, max_map_len=16,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise FrameError(f"does not unpack: {type(error).__name__}") from None
    if not isinstance(value, dict):
        raise FrameError(f"a {type(value).__name__}, not a map")
    return value


class DialBackService:
    """Serves dial-back requests on ``p2p`` for a peer of a swarm with ``access``'s rules."""

    def __init__(self, p2p: P2P, access: Access = PUBLIC, dial: Dial = tcp_dial):
        self.p2p = p2p
        self.access = access
        self.proofs = StreamProofs(access, p2p.peer_id.to_base58())
        self.dial = dial
        self.serving = 0
        self._last_request: OrderedDict[PeerId, float] = OrderedDict()

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(PROTOCOL, self.on_stream)

    async def stop(self) -> None:
        await self.p2p.remove_binary_stream_handler(PROTOCOL)

    async def on_stream(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._too_soon(info.peer_id.to_base58()):
                await self._send(writer, self._answer(TOO_SOON))
            elif self.serving >= MAX_SERVING:
                await self._send(writer, self._answer(BUSY))
            else:
                self.serving += 1
                try:
                    await self._send(writer, await self._serve(info, reader))
                    await self._linger(reader)
                finally:
                    self.serving -= 1
        except (ConnectionError, OSError, TimeoutError):
            pass  # the requester went away; nothing to tell it
        finally:
            writer.close()

    def _too_soon(self, peer: PeerId) -> bool:
        """Whether ``peer`` asked less than REQUEST_INTERVAL s ago; either way, it asked now."""
        now = time.monotonic()
        last = self._last_request.pop(peer, None)
        self._last_request[peer] = now
        while len(self._last_request) > MAX_REMEMBERED_PEERS:
            self._last_request.popitem(last=False)  # at worst, a forgotten peer asks once more
        return last is not None and now - last < REQUEST_INTERVAL

    async def _serve(self, info, reader: asyncio.StreamReader) -> dict:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                request = await _read_frame(reader, MAX_REQUEST_BYTES)
        except FrameTooLarge:
            return self._answer(TOO_LARGE)
        except FrameError:
            return self._answer(MALFORMED)
        ports = _ports_of(request)
        if ports is None:
            return self._answer(MALFORMED)
        refusal = self._key_refusal(info.peer_id.to_base58(), request.get("proof"))
        if refusal:
            return self._answer(refusal)
        ip = stream_ip(info.addr)
        if ip is None:
            return self._answer(NO_ADDRESS)
        errors = await asyncio.gather(*(self.dial(ip, port, DIAL_TIMEOUT) for port in ports))
        checked = [{"port": p, "address": tcp_multiaddr(ip, p), "error": e} for p, e in zip(ports, errors)]
        return self._answer(OK, checked)

    def _key_refusal(self, peer: PeerId, proof: object) -> str | None:
        """In a private swarm, why the request's proof of the swarm key is refused; None when it holds."""
        if not self.access.private:
            return None
        if not isinstance(proof, bytes) or len(proof) != STREAM_PROOF_BYTES:
            return WRONG_KEY
        reason = self.proofs.check(peer, proof)
        if reason is None:
            return None
        # A proof is stale only once its MAC holds: saying so tells a holder of the key that its clock is off.
        return STALE_PROOF if reason == "stale-proof" else WRONG_KEY

    def _answer(self, status: str, ports: list[dict] | None = None) -> dict:
        return {
            "status": status, "time": time.time(), "version": package_version(), "private": self.access.private,
            "ports": ports or [],
        }

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, answer: dict) -> None:
        writer.write(_frame(answer))
        async with asyncio.timeout(READ_TIMEOUT):
            await writer.drain()

    @staticmethod
    async def _linger(reader: asyncio.StreamReader) -> None:
        """Wait until the requester has read the answer and closed its side: closing at once can
        make the daemon drop an answer it has not forwarded yet (see the transport)."""
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            async with asyncio.timeout(LINGER_TIMEOUT):
                while await reader.read(MAX_REQUEST_BYTES):
                    pass


def _ports_of(request: dict) -> list[int] | None:
    """The distinct ports a request names, in its order; None when it is not a valid request."""
    items = request.get("ports")
    if not isinstance(items, list) or len(items) > MAX_PORTS:
        return None
    ports = [requested_port(item) for item in items]
    if None in ports:
        return None
    return list(dict.fromkeys(ports))


# --- asking ----------------------------------------------------------------------------


class DialBackUnavailable(Exception):
    """The peer could not be asked, or gave no usable answer; the message says why."""


@dataclass(frozen=True)
class PortCheck:
    port: int
    address: str  # the multiaddr the server dialled: the requester's IP as it saw it, and the port
    error: str | None  # None: the connection opened


@dataclass(frozen=True)
class DialBackAnswer:
    peer: PeerId
    status: str
    time: float  # the server's wall clock when it answered
    version: str
    private: bool
    ports: tuple[PortCheck, ...]
    asked_at: float  # this host's wall clock when the request left
    answered_at: float  # and when the answer came


async def ask_dial_back(
    p2p: P2P, peer: PeerId, ports: list[int], access: Access = PUBLIC, timeout: float = 15.0
) -> DialBackAnswer:
    """Ask ``peer`` to dial ``ports`` (at most MAX_PORTS) of this host back; DialBackUnavailable
    when it cannot be asked or its answer is no answer."""
    request: dict = {"ports": list(ports[:MAX_PORTS])}
    proof = access.stream_proof(p2p.peer_id.to_base58(), peer)
    if proof:
        request["proof"] = proof
    asked = time.time()
    try:
        async with asyncio.timeout(timeout):
            _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer), PROTOCOL)
            try:
                writer.write(_frame(request))
                await writer.drain()
                raw = await _read_frame(reader, MAX_ANSWER_BYTES)
            finally:
                writer.close()
    except TimeoutError:
        raise DialBackUnavailable(f"no answer within {timeout:g} s") from None
    except FrameError as error:
        raise DialBackUnavailable(f"its answer is not one: {error}") from None
    except Exception as error:  # the daemon reports a failed dial or an unknown protocol as a generic error
        if "protocols not supported" in str(error):
            raise DialBackUnavailable("it serves no dial-back (a plain DHT node, or an older peer)") from error
        raise DialBackUnavailable(f"cannot open a stream to it: {_text(str(error))}") from error
    return _parse_answer(raw, peer, ports, asked, time.time())


def _parse_answer(raw: dict, peer: PeerId, asked_ports: list[int], asked: float, answered: float) -> DialBackAnswer:
    """An answer read from a peer, which may say anything: checked, clipped, and only of the ports asked."""
    status, stamp, version, private = raw.get("status"), raw.get("time"), raw.get("version"), raw.get("private")
    valid = (
        status in STATUSES and isinstance(stamp, int | float) and not isinstance(stamp, bool) and math.isfinite(stamp)
        and isinstance(version, str) and isinstance(private, bool) and isinstance(raw.get("ports"), list)
    )
    if not valid:
        raise DialBackUnavailable("its answer lacks the status, time, version or ports")
    checks = {}
    for item in raw["ports"]:
        port = item.get("port") if isinstance(item, dict) else None
        if not isinstance(port, int) or isinstance(port, bool) or port not in asked_ports[:MAX_PORTS]:
            continue
        error = item.get("error")
        checks[port] = PortCheck(port, _text(item.get("address")), None if error is None else _text(error))
    return DialBackAnswer(peer, status, float(stamp), _text(version), private, tuple(checks.values()), asked, answered)


def _text(value: object) -> str:
    """Text from the network, fit for a terminal line: printable characters, clipped."""
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."
