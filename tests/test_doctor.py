"""`peer doctor` and the dial-back service it asks: what each bad setup is diagnosed as, and what a
stranger can make the service do. The service's bounds are tested on its stream handler with
streams made in this process; the diagnoses, against bootstrap peers started in this process (a
DHT node each, serving dial-back as `peer run` does, on an event loop in a thread of its own)."""

import asyncio
import math
import os
import socket
import struct
import threading
from types import SimpleNamespace

import hivemind
import msgpack
import pytest
from hivemind.dht.crypto import RSASignatureValidator

from peer.config import RunConfig
from peer.net.access import PUBLIC, Access
from peer.net.dialback import (
    BUSY,
    MALFORMED,
    MAX_PORTS,
    MAX_REQUEST_BYTES,
    MAX_SERVING,
    NO_ADDRESS,
    OK,
    STALE_PROOF,
    TOO_LARGE,
    TOO_SOON,
    WRONG_KEY,
    DialBackService,
    DialBackUnavailable,
    _parse_answer,
    _read_frame,
    requested_port,
)
from peer.net.doctor import DIAL_TODO, _loopback_problem, check_clock, run_doctor, this_fingerprint
from peer.net.membership import Membership, PeerRecord
from tests.helpers import LOOPBACK, free_port

KEY = bytes(range(32))
SERVER, ALICE, BOB = "server-peer", "alice-peer", "bob-peer"
HERE = "/ip4/127.0.0.1/tcp/40001"  # the address a stream came from, as the daemon gives it


# --- the dial-back service, on streams made in this process -------------------------------------


class Collected:
    """A stream writer that keeps what is written to it."""

    def __init__(self):
        self.data = bytearray()
        self.closed = False

    def write(self, data):
        self.data += data

    async def drain(self):
        pass

    def close(self):
        self.closed = True


def request_bytes(request) -> bytes:
    body = msgpack.packb(request, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def stream(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


class Dials:
    """Records where the service connects, without connecting; ports in ``open`` accept."""

    def __init__(self, open_ports=()):
        self.made, self.open = [], set(open_ports)

    async def __call__(self, host, port, timeout):
        self.made.append((host, port))
        return None if port in self.open else "connection refused"


def service(access=PUBLIC, dials=None):
    p2p = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: SERVER))
    return DialBackService(p2p, access, dial=dials or Dials())


async def ask(served, request, sender=ALICE, address=HERE, raw=None) -> dict:
    info = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: sender), addr=address)
    writer = Collected()
    await served.on_stream(info, stream(raw if raw is not None else request_bytes(request)), writer)
    assert writer.closed
    return await _read_frame(stream(bytes(writer.data)), 1 << 16)


async def test_the_service_dials_only_the_address_the_stream_came_from():
    dials = Dials(open_ports={8080})
    answer = await ask(service(dials=dials), {"ports": ["/ip4/203.0.113.9/tcp/8080", 9090]})
    assert dials.made == [("127.0.0.1", 8080), ("127.0.0.1", 9090)]  # never 203.0.113.9, which the request named
    assert answer["status"] == OK and not answer["private"] and math.isfinite(answer["time"])
    assert answer["ports"] == [
        {"port": 8080, "address": "/ip4/127.0.0.1/tcp/8080", "error": None},
        {"port": 9090, "address": "/ip4/127.0.0.1/tcp/9090", "error": "connection refused"},
    ]


@pytest.mark.parametrize("address", [
    "/ip4/198.51.100.1/tcp/4001/p2p/QmRelay/p2p-circuit",  # relayed: the IP is the relay's
    "/dns4/example.com/tcp/4001",
    "/unix/tmp/socket",
    "",
])
async def test_a_stream_from_an_unknown_or_relayed_address_is_refused_without_a_dial(address):
    dials = Dials()
    answer = await ask(service(dials=dials), {"ports": [8080]}, address=address)
    assert answer["status"] == NO_ADDRESS and dials.made == []


async def test_an_oversized_request_is_refused_unread():
    dials = Dials()
    announced = struct.pack(">I", MAX_REQUEST_BYTES + 1) + b"\0" * 16
    assert (await ask(service(dials=dials), None, raw=announced))["status"] == TOO_LARGE
    assert dials.made == []


@pytest.mark.parametrize("request_", [
    {"ports": list(range(1, MAX_PORTS + 2))},
    {"ports": [0]},
    {"ports": [70000]},
    {"ports": ["/ip4/127.0.0.1/udp/53"]},
    {"ports": "8080"},
    {"ports": [True]},
    {},
    [8080],
])
async def test_a_malformed_request_is_refused_without_a_dial(request_):
    dials = Dials()
    assert (await ask(service(dials=dials), request_))["status"] == MALFORMED
    assert dials.made == []


async def test_garbage_and_truncated_requests_are_refused():
    served = service()
    assert (await ask(served, None, raw=struct.pack(">I", 8) + b"\xc1" * 8))["status"] == MALFORMED
    assert (await ask(served, None, sender=BOB, raw=struct.pack(">I", 100) + b"\x80"))["status"] == MALFORMED


async def test_a_peer_is_served_once_per_interval_and_the_busy_service_refuses():
    dials = Dials()
    served = service(dials=dials)
    assert (await ask(served, {"ports": [8080]}))["status"] == OK
    assert (await ask(served, {"ports": [8080]}))["status"] == TOO_SOON
    assert dials.made == [("127.0.0.1", 8080)]
    served.serving = MAX_SERVING  # as many requests in flight as it serves at once
    assert (await ask(served, {"ports": [8080]}, sender=BOB))["status"] == BUSY
    served.serving = 0
    assert (await ask(served, {"ports": [8080]}, sender="carol-peer"))["status"] == OK


async def test_in_a_private_swarm_only_a_valid_proof_of_the_key_is_served():
    dials = Dials()
    served = service(Access(KEY), dials)
    members, outsiders = Access(KEY), Access(bytes(32))
    refused = [
        {"ports": [8080]},  # no proof
        {"ports": [8080], "proof": outsiders.stream_proof(ALICE, SERVER)},  # another key
        {"ports": [8080], "proof": members.stream_proof(ALICE, "someone-else")},  # for another receiver
        {"ports": [8080], "proof": b"short"},
    ]
    for number, request in enumerate(refused):
        answer = await ask(served, request, sender=f"peer-{number}")
        assert answer["status"] == WRONG_KEY and answer["ports"] == [] and answer["private"]
    stale = {"ports": [8080], "proof": members.stream_proof(BOB, SERVER, now=1000.0)}
    assert (await ask(served, stale, sender=BOB))["status"] == STALE_PROOF
    assert dials.made == []
    answer = await ask(served, {"ports": [8080], "proof": members.stream_proof(ALICE, SERVER)})
    assert answer["status"] == OK and dials.made == [("127.0.0.1", 8080)]


def test_a_hostile_answer_is_checked_and_clipped():
    raw = {
        "status": OK, "time": 1.0, "version": "1.0\x1b[2J" + "x" * 500, "private": False,
        "ports": [
            {"port": 8080, "address": "/ip4/1.2.3.4/tcp/8080\n", "error": None}, {"port": 22, "error": "x"}, "junk",
        ],
    }
    answer = _parse_answer(raw, SERVER, [8080], 0.0, 2.0)
    assert answer.version.startswith("1.0?[2J") and len(answer.version) <= 120
    assert [check.port for check in answer.ports] == [8080] and answer.ports[0].address == "/ip4/1.2.3.4/tcp/8080?"
    for bad in ({**raw, "time": float("nan")}, {**raw, "status": "whatever"}, {**raw, "private": "no"}):
        with pytest.raises(DialBackUnavailable):
            _parse_answer(bad, SERVER, [8080], 0.0, 2.0)


def test_a_requested_port_is_a_number_or_the_tcp_port_of_a_multiaddr():
    assert requested_port(31337) == requested_port("/ip4/10.0.0.1/tcp/31337/p2p/QmX") == 31337
    assert requested_port("/ip4/10.0.0.1/tcp/\u00b2") is requested_port(0) is requested_port(2.0) is None


# --- diagnoses that need no network ------------------------------------------------------------


def peer_address(host: str) -> str:
    return f"/ip4/{host}/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def test_a_loopback_peer_with_bootstrap_peers_on_another_host_is_told_to_listen_everywhere():
    config = RunConfig(host="127.0.0.1", initial_peers=[peer_address("203.0.113.5")])
    assert "give --host 0.0.0.0" in str(_loopback_problem(config, ["/ip4/127.0.0.1/tcp/4001"]))
    announcing = RunConfig(host="0.0.0.0", initial_peers=[peer_address("203.0.113.5")])
    assert "--announce-maddrs" in str(_loopback_problem(announcing, ["/ip4/127.0.0.1/tcp/4001"]))
    assert _loopback_problem(RunConfig(host="127.0.0.1", initial_peers=[peer_address("127.0.0.1")]), []) is None


@pytest.mark.parametrize("offset, verdict", [(0.0, "ok"), (-30.0, "problem"), (30.0, "problem")])
async def test_a_clock_off_by_more_than_a_few_seconds_is_a_problem(offset, verdict):
    answer = SimpleNamespace(peer=SERVER, time=1000.5 + offset, asked_at=1000.0, answered_at=1001.0)

    async def dial_back():
        return answer

    finding = await check_clock(SimpleNamespace(config=RunConfig(), dial_back=dial_back))
    assert finding.verdict == verdict
    if verdict == "problem":
        # Off by at least 29.5 s: the peer may have read its clock anywhere within the round trip.
        where = "29.5 s behind" if offset > 0 else "29.5 s ahead of"
        assert f"this host's clock is {where} that of peer {SERVER}" in finding.text
        assert finding.text.endswith("synchronise the clock (NTP)")


# --- diagnoses against bootstrap peers started in this process --------------------------------------


class Background:
    """An event loop in a thread of its own: the bootstrap peers' dial-back is served there while
    a test runs the doctor on its own loop."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.replicas = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def close(self):
        """Stop what runs there (p2p replicas keep tasks of their own), then the loop."""
        self.run(self._stop(self.replicas))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    @staticmethod
    async def _stop(replicas):
        for p2p in replicas:
            await p2p.shutdown()
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)


def start_bootstrap(folder, background, access=PUBLIC, records=()) -> tuple[hivemind.DHT, list[str]]:
    """A DHT node that serves dial-back as a peer does, and announces a record for each (swarm, fingerprint)."""
    from peer.net.access import load_identity

    signer = RSASignatureValidator(load_identity(folder / "identity"))
    dht = hivemind.DHT(
        host_maddrs=LOOPBACK, identity_path=str(folder / "identity"), record_validators=[signer], start=True,
        startup_timeout=60,
    )
    addresses = [str(a) for a in dht.get_visible_maddrs()]

    async def serve():
        p2p = await dht.replicate_p2p()
        background.replicas.append(p2p)
        await DialBackService(p2p, access).start()
        for swarm, fingerprint in records:
            record = PeerRecord(p2p.peer_id.to_base58(), addresses, fingerprint, 0)
            await Membership(dht, swarm, record, ttl=600, signer=signer, access=access).announce(0)

    background.run(serve())
    return dht, addresses


@pytest.fixture(scope="module")
def bootstraps(tmp_path_factory):
    """Bootstrap peers of a public swarm 'lab' (with one member, training what ``settings`` train) and
    of a swarm 'other' (whose member trains something else), and of a private swarm."""
    background, started = Background(), []
    try:
        fingerprint = this_fingerprint(RunConfig(device="cpu"))
        public = start_bootstrap(
            tmp_path_factory.mktemp("public"), background, records=[("lab", fingerprint), ("other", "0123456789abcdef")]
        )
        started.append(public[0])
        private = start_bootstrap(tmp_path_factory.mktemp("private"), background, access=Access(KEY))
        started.append(private[0])
        yield SimpleNamespace(public=public[1], private=private[1])
    finally:
        for dht in started:
            dht.shutdown()
        background.close()


def doctor(**settings) -> tuple[int, list[str]]:
    lines = []
    code = run_doctor(RunConfig(**{"device": "cpu", "swarm": "lab", **settings}), say=lines.append)
    return code, lines


def line(lines, start):
    found = [text for text in lines if text.startswith(start)]
    assert found, f"no line starts with {start!r}:\n" + "\n".join(lines)
    return found[0]


@pytest.mark.network
def test_a_good_setup_on_loopback_passes_every_check(bootstraps):
    code, lines = doctor(host="127.0.0.1", initial_peers=bootstraps.public)
    assert code == 0, "\n".join(lines)
    assert all(text.startswith(("ok: ", "result: ")) for text in lines), "\n".join(lines)
    line(lines, "ok: peers can dial this peer")
    line(lines, "ok: the 1 live peers of swarm 'lab' train the same task and model as this peer")
    assert lines[-1] == "result: a `peer run` with these settings would join swarm 'lab'"


@pytest.mark.network
def test_a_port_in_use_names_the_process_that_holds_it(bootstraps):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, lines = doctor(host="127.0.0.1", port=port, initial_peers=bootstraps.public)
    assert code == 1
    taken = f"/ip4/127.0.0.1/tcp/{port}: port {port} is in use by pid {os.getpid()} ("
    assert lines[0].startswith(f"problem: cannot listen at {taken}"), lines[0]
    line(lines, "skipped: cannot check that peers can dial this peer: it cannot listen at its address")


@pytest.mark.network
def test_an_announced_address_that_nobody_can_dial_is_a_problem(bootstraps):
    nowhere = f"/ip4/127.0.0.1/tcp/{free_port()}"
    code, lines = doctor(host="127.0.0.1", announce_maddrs=[nowhere], initial_peers=bootstraps.public)
    assert code == 1
    diagnosis = f"problem: peers cannot dial {nowhere} (connection refused); {DIAL_TODO}"
    assert line(lines, "problem: peers cannot dial") == diagnosis


@pytest.mark.network
def test_bootstrap_peers_that_are_gone_are_a_problem(tmp_path):
    gone = hivemind.DHT(host_maddrs=LOOPBACK, start=True)
    addresses = [str(a) for a in gone.get_visible_maddrs()]
    gone.shutdown()
    code, lines = doctor(host="127.0.0.1", initial_peers=addresses)
    assert code == 1
    assert lines[1] == (
        "problem: the bootstrap peer did not answer within 15 s; check the addresses (a peer prints them as it "
        "starts) and that their port is open"
    )
    assert all(text.startswith("skipped: ") for text in lines[2:-1]), "\n".join(lines)


@pytest.mark.network
@pytest.mark.parametrize("key, diagnosis", [
    (bytes(32), "problem: the swarm's peers refuse this peer's swarm key; "),
    (None, "problem: the swarm is private: its peers refuse peers without its key; give --swarm-key"),
], ids=["another-key", "no-key"])
def test_a_wrong_or_missing_swarm_key_is_told_apart(bootstraps, tmp_path, key, diagnosis):
    settings = {}
    if key:
        (tmp_path / "swarm.key").write_text(key.hex())
        settings["swarm_key"] = tmp_path / "swarm.key"
    code, lines = doctor(host="127.0.0.1", initial_peers=bootstraps.private, **settings)
    assert code == 1
    line(lines, diagnosis)
    line(lines, "skipped: the swarm's peers dial back only peers that prove its key")
    line(lines, "ok: this host's clock agrees")


@pytest.mark.network
def test_a_peer_in_client_mode_needs_no_reachable_address(bootstraps):
    code, lines = doctor(client_mode=True, initial_peers=bootstraps.public)
    assert code == 0, "\n".join(lines)
    line(lines, "ok: client mode: this peer dials out and accepts no connections")


@pytest.mark.network
def test_a_swarm_that_trains_something_else_is_a_problem(bootstraps):
    code, lines = doctor(host="127.0.0.1", initial_peers=bootstraps.public, swarm="other")
    assert code == 1
    line(lines, "problem: the 1 peers of swarm 'other' train another task, model or method (fingerprint 0123456789ab")
