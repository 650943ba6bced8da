"""Helpers that several test modules share: real peer processes and their logs, p2p daemons and
DHT nodes on loopback, a live metrics scrape, a small trainer and small Fashion-MNIST files.

Test modules import from here (and from ``tests.sim_swarm`` and ``tests.vector_learner``), never
from one another.
"""

import asyncio
import contextlib
import gzip
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import hivemind
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from gossip.message import HEADER_LENGTH_PREFIX, Message
from gossip.wire import Limits, encode
from peer.net.access import PUBLIC
from peer.net.membership import Membership, PeerRecord
from peer.net.swarm import kill_group
from peer.trainer import Trainer

# --- real peer processes ----------------------------------------------------------------

PEER = [sys.executable, "-m", "peer.cli"]
FAST = ["--rounds", "3", "--local-steps", "2", "--partition", "iid", "--exchange-timeout", "10"]


def run(args, timeout):
    """Run ``peer ARGS`` to its end; (exit code, stdout, stderr). Its process group is cleaned up."""
    process = subprocess.Popen(
        PEER + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        out, err = process.communicate()
        raise AssertionError(f"{args} did not finish in {timeout} s:\n{out}\n{err}") from None
    kill_group(process)  # the peer's DHT process and daemon too, should any have outlived it
    return process.returncode, out, err


def start(args, log):
    """Start ``peer ARGS`` in its own session, its output going to the open file ``log``."""
    return subprocess.Popen(
        PEER + args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )


def stop_all(processes, timeout=30):
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        kill_group(process)


def wait_for_line(path, pattern, process, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if match := re.search(pattern, path.read_text()):
            return match
        assert process.poll() is None, path.read_text()
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} did not appear in {path} within {timeout} s")


def wait_for_exits(processes, timeout, what="the peers"):
    """Wait until every process has exited (they finish their run on their own)."""
    deadline = time.monotonic() + timeout
    while any(process.poll() is None for process in processes):
        assert time.monotonic() < deadline, f"{what} did not finish within {timeout} s"
        time.sleep(0.2)


def wait_for_round(swarm, round_, timeout, *, everyone=False):
    """Wait until a peer of a ``LocalSwarm`` (with ``everyone``: every peer) has recorded ``round_``,
    with no peer exiting meanwhile."""
    deadline = time.monotonic() + timeout
    reached = min if everyone else max
    while reached(swarm.last_round(i) for i in swarm.processes) < round_:
        assert time.monotonic() < deadline, f"the swarm did not complete round {round_}"
        assert all(p.poll() is None for p in swarm.processes.values()), "a peer exited early"
        time.sleep(0.1)


def gossip_round(topology, values, round):
    """One mixing round of a ``topology.Topology`` on an array of values (one row per peer),
    computed peer by peer, the way peers do it."""
    mixed = np.empty_like(values)
    for peer in range(topology.n):
        incoming = topology.in_weights(peer, round)
        mixed[peer] = topology.self_weight(peer, round) * values[peer] + sum(
            weight * values[j] for j, weight in incoming.items()
        )
    return mixed


def records(swarm, index):
    """The metrics records a peer of a ``LocalSwarm`` has written so far."""
    path = swarm.folder(index) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_with_a_peer_killed(swarm, victim, rounds):
    """Run a ``LocalSwarm`` (paced, so that a round lasts a while), SIGKILL ``victim`` once every peer
    has recorded round 1, and wait for the others to finish on their own. Returns the survivors,
    the last round any of them had recorded when the victim died, and their logs; asserts that
    every survivor exited 0 and recorded every round."""
    try:
        swarm.bootstrap()
        survivors = [index for index in swarm.processes if index != victim]
        wait_for_round(swarm, 1, 150, everyone=True)
        swarm.kill(victim)
        killed_at = max(swarm.last_round(i) for i in survivors)
        assert killed_at < rounds - 2, "the run was almost over before the peer was killed"
        wait_for_exits([swarm.processes[i] for i in survivors], 180, "the survivors")
    finally:
        swarm.stop()
    logs = "\n".join((swarm.folder(i) / "log.txt").read_text() for i in survivors)
    assert [swarm.processes[i].returncode for i in survivors] == [0] * len(survivors), logs
    for index in survivors:
        assert [r["round"] for r in records(swarm, index)] == list(range(rounds)), logs
    return survivors, killed_at, logs


# --- live metrics -----------------------------------------------------------------------


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- p2p daemons and DHT nodes on loopback, started from this process ---------------------

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
MODEL = {"x": torch.zeros(16_384)}  # 64 KiB of float32: the largest payload the victim accepts
LIMITS = Limits(max_payload_bytes=1 << 16, max_header_bytes=1 << 12)  # a model of one tensor has a ~100-byte header


async def eventually(condition, seconds: float = 30.0) -> None:
    """Wait until ``condition()`` holds; the deadline only bounds a failing test."""
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the condition did not come true within the deadline")


def wire(message: Message) -> bytes:
    return b"".join(bytes(frame) for frame in encode(message))


def buffered_size(message: Message) -> int:
    """What reading the message reserves from the budget: its header and its payload."""
    return len(wire(message)) - HEADER_LENGTH_PREFIX


@contextlib.asynccontextmanager
async def daemons(count: int):
    """The p2p of ``count`` fresh peers: the victim's first, then the attacker's and the honest sender's.

    Fresh for each test: a daemon's handler does not survive the replica that registered it
    shutting down, so daemons are not shared between tests."""
    first = hivemind.DHT(start=True, host_maddrs=LOOPBACK)
    started = [first]
    try:
        for _ in range(count - 1):
            started.append(hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=first.get_visible_maddrs()))
        yield [await dht.replicate_p2p() for dht in started]
    finally:
        for dht in started:
            dht.shutdown()


def membership(node, swarm, access=PUBLIC):
    """The membership in ``swarm`` of one of the ``dhts`` fixture's (node, signer)."""
    dht, signer = node
    record = PeerRecord(dht.peer_id.to_base58(), [], "fp", 0)
    return Membership(dht, swarm, record, ttl=30, signer=signer, access=access)


# --- a small trainer, small data ---------------------------------------------------------


def blobs(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 2, generator=g) + 4 * torch.nn.functional.one_hot(y, 3)[:, :2].float()
    return x, y


def make_trainer(seed=0, schedule=None, lr=0.1, optimizer="sgd"):
    torch.manual_seed(0)
    x, y = blobs()
    return Trainer(
        torch.nn.Linear(2, 3), (x[:300], y[:300]), (x[300:], y[300:]),
        lr=lr, momentum=0.9, weight_decay=0.0, batch_size=32, seed=seed, device=torch.device("cpu"),
        schedule=schedule, optimizer=optimizer,
    )


FASHION_FILES = {
    "train-images-idx3-ubyte.gz": (3, (20, 28, 28)),
    "train-labels-idx1-ubyte.gz": (1, (20,)),
    "t10k-images-idx3-ubyte.gz": (3, (10, 28, 28)),
    "t10k-labels-idx1-ubyte.gz": (1, (10,)),
}


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_fashion_files(folder: Path, train: int = 20, test: int = 10) -> dict[str, bytes]:
    """Write small, well-formed Fashion-MNIST files that can be learnt: an image of class c is
    noise with a bright square at a place that depends on c. Returns their gzipped bytes by name."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    for prefix, count in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, size=count)
        images = rng.integers(0, 100, size=(count, 28, 28))
        for image, label in zip(images, labels):
            row, column = divmod(int(label), 5)
            image[2 + 12 * row : 12 + 12 * row, 1 + 5 * column : 6 + 5 * column] = 255
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte.gz"
            written[name] = gzip.compress(idx_bytes(array))
            (folder / name).write_bytes(written[name])
    assert written.keys() == FASHION_FILES.keys()
    return written
