"""Who may join: identities, swarm keys, peer lists, stream proofs, and records bound to their owner."""

import asyncio
import contextlib
import json
import struct
from dataclasses import asdict, replace
from types import SimpleNamespace

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import get_dht_time

from gossip.transport import PeerUnreachable
from peer.cli import main
from peer.net.access import (
    MAX_REMEMBERED_NONCES,
    PROOF_FUTURE_SECONDS,
    PROOF_WINDOW_SECONDS,
    PUBLIC,
    Access,
    AccessError,
    StreamProofs,
    generate_swarm_key,
    load_allowed_peers,
    load_identity,
    load_swarm_key,
    peer_id_of,
)
from peer.net.membership import Membership, PeerRecord
from peer.net.status import swarm_status
from peer.net.transport import PROTOCOL, P2PTransport
from tests.helpers import (
    FAST,
    LIMITS,
    MODEL,
    buffered_size,
    daemons,
    eventually,
    membership,
    start,
    stop_all,
    wait_for_line,
    wire,
)

KEY = bytes(range(32))


def test_keygen_writes_a_private_key_file_and_never_overwrites_it(tmp_path, capsys):
    path = tmp_path / "swarm.key"
    assert main(["keygen", "--out", str(path)]) == 0
    assert len(load_swarm_key(path)) == 32 and path.stat().st_mode & 0o777 == 0o600
    before = path.read_text()
    assert main(["keygen", "--out", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err and path.read_text() == before
    other = tmp_path / "other.key"
    generate_swarm_key(other)
    assert load_swarm_key(other) != load_swarm_key(path)


@pytest.mark.parametrize("content", ["", "zz" * 32, "ab" * 31, "ab" * 33])
def test_a_file_that_is_not_a_swarm_key_is_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.key"
    path.write_text(content)
    with pytest.raises(AccessError, match="is not a swarm key"):
        load_swarm_key(path)
    with pytest.raises(AccessError, match="cannot read"):
        load_swarm_key(tmp_path / "missing.key")


@pytest.mark.network  # the peer's reaper process starts before the key is read
def test_a_run_with_a_bad_swarm_key_exits_2_before_starting(tmp_path, capsys):
    bad = tmp_path / "bad.key"
    bad.write_text("secret")
    assert main(["run", "--swarm-key", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "is not a swarm key" in capsys.readouterr().err


def test_allowed_peers_are_read_one_per_line_with_comments(tmp_path):
    ids = [peer_id_of(load_identity(tmp_path / f"id{i}").get_public_key()) for i in range(2)]
    path = tmp_path / "peers.txt"
    path.write_text(f"# the lab\n{ids[0]}  # laptop\n\n{ids[1]}\n")
    assert load_allowed_peers(path) == frozenset(ids)
    path.write_text(f"{ids[0]}\nnot-a-peer\n")
    with pytest.raises(AccessError, match="line 2: 'not-a-peer' is not a peer id"):
        load_allowed_peers(path)
    path.write_text("# nobody\n")
    with pytest.raises(AccessError, match="lists no peer ids"):
        load_allowed_peers(path)


def test_a_peer_id_is_derived_from_the_identity_key_as_libp2p_does(tmp_path):
    path = tmp_path / "identity.key"
    key = load_identity(path)  # made, as the daemon would make it
    assert peer_id_of(key.get_public_key()) == PeerID.from_identity(path.read_bytes()).to_base58()
    assert peer_id_of(load_identity(path).get_public_key()) == peer_id_of(key.get_public_key())


def test_an_identity_that_is_not_an_rsa_key_is_a_clear_error(tmp_path):
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"\xff" * 40)
    with pytest.raises(AccessError, match="is not a libp2p private key"):
        load_identity(garbage)
    ed25519 = tmp_path / "ed25519.key"
    ed25519.write_bytes(crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=b"\0" * 64).SerializeToString())
    with pytest.raises(AccessError, match="holds a Ed25519 key"):
        load_identity(ed25519)


def test_a_record_proof_holds_only_for_its_peer_and_key():
    access = Access(KEY)
    proof = access.record_proof("alice")
    assert access.admits_record("alice", proof)
    assert not access.admits_record("mallory", proof)  # copied from another member
    assert not access.admits_record("alice", Access(bytes(32)).record_proof("alice"))
    assert not access.admits_record("alice", "") and not access.admits_record("alice", None)
    assert Access().admits_record("anyone", "")  # a public swarm
    listed = Access(allowed=frozenset({"alice"}))
    assert listed.admits_record("alice", "") and not listed.admits_record("bob", "")
    assert access.dht_key("lab") != Access().dht_key("lab") != Access(bytes(32)).dht_key("lab")


def test_a_stream_proof_is_bound_to_its_ends_and_refused_when_replayed_or_stale():
    access = Access(KEY)
    proofs = StreamProofs(access, "bob")
    proof = access.stream_proof("alice", "bob", now=1000.0)
    assert proofs.check("alice", proof, now=1001.0) is None
    assert proofs.check("alice", proof, now=1002.0) == "replayed"
    assert proofs.check("carol", access.stream_proof("alice", "bob", now=1000.0), now=1000.0) == "not-member"
    assert StreamProofs(access, "dave").check("alice", access.stream_proof("alice", "bob"), now=None) == "not-member"
    assert proofs.check("alice", Access(bytes(32)).stream_proof("alice", "bob", now=1000.0), now=1000.0) == "not-member"
    late = access.stream_proof("alice", "bob", now=1000.0)
    assert proofs.check("alice", late, now=1000.0 + PROOF_WINDOW_SECONDS + 1) == "stale-proof"
    nan = struct.pack(">d", float("nan")) + access.stream_proof("alice", "bob")[8:]
    assert proofs.check("alice", nan) == "not-member"  # the MAC covers the time, so it cannot be edited
    assert proofs.check("alice", b"short") == "not-member"
    assert Access().stream_proof("alice", "bob") == b""


def test_remembered_nonces_are_bounded_and_forgotten_after_the_window(monkeypatch):
    monkeypatch.setattr("peer.net.access.MAX_REMEMBERED_NONCES", 3)
    access = Access(KEY)
    proofs = StreamProofs(access, "bob")
    for _ in range(3):
        assert proofs.check("alice", access.stream_proof("alice", "bob", now=0.0), now=0.0) is None
    assert proofs.check("alice", access.stream_proof("alice", "bob", now=0.0), now=0.0) == "over-capacity"
    later = PROOF_WINDOW_SECONDS + 1
    assert proofs.check("alice", access.stream_proof("alice", "bob", now=later), now=later) is None
    assert MAX_REMEMBERED_NONCES >= 1 << 16


def test_a_proof_stamped_ahead_is_remembered_until_its_stamp_expires_so_a_late_replay_is_refused():
    access = Access(KEY)
    proofs = StreamProofs(access, "bob")
    ahead = access.stream_proof("alice", "bob", now=1000.0 + PROOF_FUTURE_SECONDS)
    assert proofs.check("alice", ahead, now=1000.0) is None
    # Past the time its arrival was once forgotten at (arrival + window), within its stamp's window.
    assert proofs.check("alice", ahead, now=1000.0 + PROOF_WINDOW_SECONDS + 1) == "replayed"
    assert proofs.check("alice", ahead, now=1000.0 + PROOF_FUTURE_SECONDS + PROOF_WINDOW_SECONDS + 1) == "stale-proof"


def test_a_proof_stamped_further_ahead_than_clocks_may_run_is_stale():
    access = Access(KEY)
    proofs = StreamProofs(access, "bob")
    far = access.stream_proof("alice", "bob", now=1000.0 + PROOF_FUTURE_SECONDS + 1)
    assert proofs.check("alice", far, now=1000.0) == "stale-proof"
    behind = access.stream_proof("alice", "bob", now=1000.0 - PROOF_WINDOW_SECONDS + 1)
    assert proofs.check("alice", behind, now=1000.0) is None  # a clock behind ours by up to the window


# Records in a real DHT: honest nodes sign with their identities; mallory runs hivemind as it comes,
# without the validator that honest peers use; trudy signs her own records properly but is not a member.


@pytest.mark.network
def test_nobody_can_write_or_withdraw_another_peers_record(dhts):
    alice, bob, mallory, _ = (membership(node, "forged") for node in dhts)

    async def main():
        await alice.announce(3)
        await bob.announce(4)
        tombstone = asdict(replace(alice.record, left=True))
        expiry = get_dht_time() + 300  # outlives alice's own refreshes
        # Under alice's signed subkey, without her signature: honest nodes refuse to store or return it.
        await mallory.dht.store(alice.key, tombstone, expiry, subkey=dhts[0][1].local_public_key, return_future=True)
        # Under a subkey that names alice but carries no key: stored, but nobody takes it for hers.
        await mallory.dht.store(alice.key, tombstone, expiry, subkey=alice.record.peer_id, return_future=True)
        return await bob.refresh()

    live = asyncio.run(main())
    assert alice.record.peer_id in live and not live[alice.record.peer_id].left and live[alice.record.peer_id].round == 3
    assert bob.rejected["unsigned-record"] >= 1


@pytest.mark.network
def test_a_copied_fingerprint_does_not_make_a_member_of_a_private_swarm(dhts):
    access = Access(KEY)
    alice, bob = membership(dhts[0], "private", access), membership(dhts[1], "private", access)
    # The attacker knows the swarm's name, the task, the fingerprint, even where the records live,
    # and signs its own record properly; it lacks the key.
    outsider = membership(dhts[3], "private", Access(bytes(32)))
    outsider.key = alice.key

    async def main():
        await alice.announce(1)
        await bob.announce(1)
        await outsider.announce(1)
        return await alice.refresh()

    live = asyncio.run(main())
    members = {alice.record.peer_id, bob.record.peer_id}
    assert set(live) == members
    assert alice.rejected["not-member"] == 1 and outsider.record.peer_id not in alice.seen
    assert not asyncio.run(alice.is_member(outsider.record.peer_id))
    assert asyncio.run(alice.is_member(bob.record.peer_id))
    # peer status lists the members only with the key; without it, it finds nothing there.
    listed = asyncio.run(swarm_status(dhts[3][0], "private", 30, access))
    assert {row["peer"] for row in listed["peers"]} == members and listed["records_ignored"] == {"not-member": 1}
    assert asyncio.run(swarm_status(dhts[3][0], "private", 30))["peers"] == []


@pytest.mark.network
def test_peers_outside_the_list_are_not_members(dhts):
    alice_id = dhts[0][0].peer_id.to_base58()
    access = Access(allowed=frozenset({alice_id}))
    alice, mallory = membership(dhts[0], "listed", access), membership(dhts[3], "listed")

    async def main():
        await alice.announce(1)
        await mallory.announce(1)
        return await alice.refresh()

    assert set(asyncio.run(main())) == {alice_id}
    assert alice.rejected["not-member"] == 1


# Real peers of a private swarm, with an outsider that has everything but the key.


@pytest.mark.network
def test_a_private_swarm_trains_as_before_and_an_outsider_gets_no_place_in_it(tmp_path):
    key = tmp_path / "lab.key"
    generate_swarm_key(key)
    common = ["run", "--swarm", "lab", *FAST, "--shards", "2", "--join-timeout", "90"]
    processes = []
    try:
        # The outsider, with everything but the key, is even the members' way into the DHT.
        with open(tmp_path / "outsider.log", "w") as log:
            outsider = start([*common, "--rounds", "10000", "--pace", "0.5", "--shard", "1", "--out", str(tmp_path / "outsider")], log)
        processes.append(outsider)
        address = wait_for_line(tmp_path / "outsider.log", r"--initial-peers (\S+)", outsider, timeout=90).group(1)
        for shard, name in enumerate("ab"):
            with open(tmp_path / f"{name}.log", "w") as log:
                processes.append(start([
                    *common, "--swarm-key", str(key), "--min-peers", "2", "--shard", str(shard),
                    "--initial-peers", address, "--out", str(tmp_path / name),
                ], log))
            # One at a time: daemons dialling the same peer at once on a loaded host may time out.
            wait_for_line(tmp_path / f"{name}.log", r"--initial-peers (\S+)", processes[-1], timeout=90)
        for process, name in zip(processes[1:], "ab", strict=True):
            assert process.wait(timeout=240) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        assert outsider.poll() is None
    finally:
        stop_all(processes)
    a, b, outsider = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("a", "b", "outsider"))
    assert a["private_swarm"] and b["private_swarm"] and not outsider["private_swarm"]
    assert sorted(a["peers_seen"]) == sorted(b["peers_seen"]) == sorted([a["peer"], b["peer"]])
    assert outsider["peers_seen"] == [outsider["peer"]] and outsider["bytes_received_total"] == 0
    for member in (a, b):
        assert member["rounds_completed"] == 3 and member["missed_exchanges_total"] == 0 and member["rejected_total"] == 0


# Streams between real p2p daemons: a member, a victim that is a member, and an outsider.


@contextlib.asynccontextmanager
async def serving(p2p, access):
    """A transport of ``access`` that keeps every model its handler gets."""
    transport = P2PTransport(p2p, LIMITS, access=access)
    transport.received = []

    async def keep(message):
        transport.received.append(message)

    transport.serve("model", keep)
    await transport.start()
    try:
        yield transport
    finally:
        await transport.stop()


@pytest.mark.network
async def test_streams_without_a_valid_proof_of_the_swarm_key_are_refused_before_their_header():
    from gossip.message import Message

    async with daemons(3) as (victim_p2p, member_p2p, outsider_p2p), serving(victim_p2p, Access(KEY)) as victim:
        member = P2PTransport(member_p2p, LIMITS, access=Access(KEY))
        model = Message("model", member.peer_id, 0, MODEL)
        await member.send(victim.peer_id, model)
        await eventually(lambda: len(victim.received) == 1)

        outsider_id = outsider_p2p.peer_id.to_base58()
        for access in (PUBLIC, Access(bytes(32))):  # no key, another key: a valid model all the same
            outsider = P2PTransport(outsider_p2p, LIMITS, access=access)
            await outsider.send(victim.peer_id, Message("model", outsider_id, 0, MODEL))
        # A member's proof, replayed by the member itself, and one made for another receiver.
        proof = Access(KEY).stream_proof(member.peer_id, victim.peer_id)
        for opening in (proof, proof, Access(KEY).stream_proof(member.peer_id, outsider_id)):
            _, _, writer = await member_p2p.call_binary_stream_handler(victim_p2p.peer_id, PROTOCOL)
            writer.write(opening + wire(model))
            await writer.drain()
        await eventually(lambda: sum(victim.counters.rejections.values()) == 4)
        assert victim.counters.rejections == {"not-member": 3, "replayed": 1}
        assert len(victim.received) == 2 and {m.sender for m in victim.received} == {member.peer_id}
        assert victim.buffered.peak == buffered_size(model)  # nothing was buffered for a refused stream


@pytest.mark.network
async def test_a_list_of_allowed_peers_closes_every_other_peers_streams():
    from gossip.message import Message

    async with daemons(3) as (victim_p2p, member_p2p, outsider_p2p):
        members = Access(allowed=frozenset({member_p2p.peer_id.to_base58()}))
        async with serving(victim_p2p, members) as victim:
            member, outsider = P2PTransport(member_p2p, LIMITS), P2PTransport(outsider_p2p, LIMITS)
            await member.send(victim.peer_id, Message("model", member.peer_id, 0, MODEL))
            # The victim closes the outsider's stream at once: while the model is still being written
            # that reaches the outsider as a lost stream, after it as nothing at all.
            with contextlib.suppress(PeerUnreachable):
                await outsider.send(victim.peer_id, Message("model", outsider.peer_id, 0, MODEL))
            await eventually(lambda: len(victim.received) == 1 and victim.counters.rejections["not-member"] == 1)
            assert victim.received[0].sender == member_p2p.peer_id.to_base58()


class ForgetfulDHT:
    """A DHT whose readings come from nodes that missed some stores: each reading returns the
    records listed for it, one after another."""

    def __init__(self, readings):
        self.readings = list(readings)

    async def get(self, key, latest, return_future):
        entries = self.readings.pop(0)
        return SimpleNamespace(value={subkey: SimpleNamespace(value=value, expiration_time=expiry)
                                      for subkey, (value, expiry) in entries.items()})


def test_a_record_that_one_reading_misses_stays_until_it_expires(tmp_path):
    keys = [RSASignatureValidator(load_identity(tmp_path / name)) for name in ("alice", "bob", "carol")]
    alice, bob, carol = (peer_id_of(key._private_key.get_public_key()) for key in keys)
    expiries = [get_dht_time() + 60, get_dht_time() + 60, get_dht_time() - 1]  # carol's record has just expired
    first = {
        key.local_public_key: (asdict(PeerRecord(peer, [], "fp", 0)), expiry)
        for key, peer, expiry in zip(keys, (alice, bob, carol), expiries)
    }
    second = {keys[0].local_public_key: first[keys[0].local_public_key]}  # from a node that missed bob and carol
    view = Membership(ForgetfulDHT([first, second]), "swarm", PeerRecord(alice, [], "fp", 0), ttl=30)

    async def main():
        await view.refresh()
        await view.refresh()
        assert await view.is_member(bob)

    asyncio.run(main())
    assert sorted(view.seen) == sorted([alice, bob]) and sorted(view.live) == sorted([alice, bob])
