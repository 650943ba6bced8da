"""Real MoDeST and SRRW peers on loopback, and a stranger with no membership record who sends
them every word the protocols act on: forged goodbyes, views of made-up peers, rounds ratcheted
far ahead, an absurd final model, a forged token, REVOKE and DONE. The transport's admission
refuses each one before any handler sees it, and both runs go on to their last round."""

import asyncio
import contextlib
import json

import hivemind
import pytest
import torch

from gossip.message import Message
from gossip.protocols import modest, srrw
from gossip.token import Token, token_message
from gossip.transport import PeerUnreachable
from gossip.view import Entry, View
from gossip.wire import Limits
from peer.net.transport import P2PTransport
from tests.helpers import FAST, start, stop_all, wait_for_exits, wait_for_line
from topology.walk import VisitCounts

pytestmark = pytest.mark.network


def modest_attack(stranger: str, victims: list[str]) -> list[Message]:
    forged = View(stranger, victims)
    forged.merge({victims[0]: Entry(0, 2**40, True)})  # "the first victim left, for good"
    crowd = View(stranger)
    crowd.merge({f"made-up-{i:05d}-" + "x" * 100: Entry(0) for i in range(1000)})
    ratchet = []
    for step in range(1, 121):
        forged.touch(stranger, 50 * step)
        ratchet.append(Message(modest.LEAVE, stranger, 50 * step, forged.encode()))
    final = Message(modest.MODEL, stranger, 39, {**forged.encode(), "poison": torch.full((4,), 1e30)})
    return [Message(modest.LEAVE, stranger, 0, forged.encode()), Message(modest.LEAVE, stranger, 0, crowd.encode()), *ratchet, final]


def srrw_attack(stranger: str, victims: list[str]) -> list[Message]:
    token = Token(0, 7, 1, {"poison": torch.full((4,), 1e30)}, VisitCounts.uniform(victims))
    words = [
        Message(srrw.REVOKE, stranger, 1, meta={"token": 0, "generation": 2**62 - 1}),
        Message(srrw.DONE, stranger, 30, meta={"token": 0, "generation": 0}),
    ]
    return [token_message(srrw.TOKEN, stranger, token), *words]


async def refused(transport: P2PTransport, victim: str, message: Message) -> None:
    """Send; the victim closes the stream as soon as it opens, which may cut the write short."""
    with contextlib.suppress(PeerUnreachable):
        await transport.send(victim, message)


async def send_as_stranger(addresses: list[str], victims: list[str], attack) -> None:
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=addresses)
    try:
        transport = P2PTransport(await dht.replicate_p2p(), Limits(max_payload_bytes=1 << 20))
        messages = attack(transport.peer_id, victims)
        for message in messages:
            await asyncio.gather(*(refused(transport, victim, message) for victim in victims))
    finally:
        dht.shutdown()


def run_under_attack(tmp_path, algorithm_args, rounds, attack) -> list[dict]:
    common = ["run", "--swarm", "attacked", *FAST, "--rounds", str(rounds), "--shards", "2", "--pace", "0.3",
              "--join-timeout", "90", "--min-peers", "2", *algorithm_args]
    processes, addresses = [], []
    try:
        for shard, name in enumerate("ab"):
            with open(tmp_path / f"{name}.log", "w") as log:
                initial = ["--initial-peers", addresses[0]] if addresses else []
                processes.append(start([*common, "--shard", str(shard), *initial, "--out", str(tmp_path / name)], log))
            addresses.append(wait_for_line(tmp_path / f"{name}.log", r"--initial-peers (\S+)", processes[-1], timeout=90).group(1))
        victims = [address.rsplit("/p2p/", 1)[1] for address in addresses]
        asyncio.run(send_as_stranger(addresses, victims, attack))
        wait_for_exits(processes, 240)
        logs = [(tmp_path / f"{name}.log").read_text()[-3000:] for name in "ab"]
        assert [process.returncode for process in processes] == [0, 0], logs
    finally:
        stop_all(processes)
    return [json.loads((tmp_path / name / "summary.json").read_text()) for name in "ab"]


def assert_all_refused(summary: dict) -> None:
    """The stranger's streams were refused unread (as a non-member, and, once it held its share of
    open streams waiting for a re-read of the records, as one over capacity and then ignored): none
    of its words or models reached a protocol, which would have counted them otherwise."""
    assert summary["rejections"].get("not-member", 0) >= 1, summary["rejections"]
    reached = {"implausible", "outlier", "invalid-model", "stale-token", "unknown-kind", "wrong-sender"}
    assert not reached & set(summary["rejections"]), summary["rejections"]


def test_a_stranger_cannot_end_stall_or_poison_a_modest_run(tmp_path):
    summaries = run_under_attack(tmp_path, ["--algorithm", "modest", "--sample-size", "2"], 40, modest_attack)
    for summary in summaries:
        assert summary["rounds_completed"] == 40 and summary["final_model"], summary
        assert_all_refused(summary)
        assert summary["mean_accuracy"] > 0.3, summary


def test_a_stranger_cannot_end_or_redirect_a_walk(tmp_path):
    summaries = run_under_attack(tmp_path, ["--algorithm", "srrw"], 30, srrw_attack)
    assert sum(summary["rounds_recorded"] for summary in summaries) == 30
    for summary in summaries:
        assert summary["rounds_completed"] == 30, summary
        assert_all_refused(summary)
