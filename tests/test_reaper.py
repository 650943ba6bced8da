"""Nothing a peer starts outlives it, however the peer dies."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from peer.net.reaper import descendants, kill_all, process_table
from peer.net.swarm import kill_group
from tests.helpers import PEER, wait_for_line

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(not process_table(), reason="the watcher reads /proc, which this system lacks"),
]


def alive(processes: dict[int, str]) -> dict[int, str]:
    table = process_table()
    return {pid: started for pid, started in processes.items() if pid in table and table[pid][1] == started}


def wait_until_gone(processes: dict[int, str], timeout: float) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while (left := alive(processes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_descendants_are_found_through_every_generation_and_a_reused_id_is_left_alone():
    parent = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(found := descendants(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(found) == 2 and parent.pid not in found
        first, second = sorted(found)
        kill_all({first: found[first], second: "not its start time"})
        assert wait_until_gone({first: found[first]}, 5) == {}
        assert alive({second: found[second]}) == {second: found[second]}
    finally:
        kill_group(parent)


OWNER = """
import subprocess, sys, time
from peer.net.reaper import start_reaper
reaper = start_reaper()
child = subprocess.Popen(["sleep", "60"])
time.sleep(1.5)  # two of the watcher's scans
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_killed_owners_processes_are_killed_by_its_watcher():
    owner = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(OWNER)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        child = int(owner.stdout.readline())
        family = descendants(owner.pid)
        assert child in family and len(family) == 2  # the child, and the watcher
        owner.send_signal(signal.SIGKILL)
        assert wait_until_gone(family, 10) == {}
    finally:
        kill_group(owner)


def test_a_peer_killed_outright_leaves_no_process_behind(tmp_path):
    log = tmp_path / "peer.log"
    with open(log, "w") as out:
        peer = subprocess.Popen(
            PEER + ["run", "--rounds", "100000", "--pace", "1", "--local-steps", "1", "--out", str(tmp_path / "run")],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        wait_for_line(log, r"in swarm", peer, timeout=90)
        time.sleep(1.5)  # the watcher's scans see the daemon
        family = descendants(peer.pid)
        names = {pid: (process_table_name(pid) or "") for pid in family}
        assert any("p2pd" in name for name in names.values()), names  # the DHT's libp2p daemon is among them
        assert len(family) >= 3, names  # the watcher, the DHT process and its daemon
        peer.send_signal(signal.SIGKILL)
        assert wait_until_gone(family, 10) == {}, {pid: names[pid] for pid in alive(family)}
    finally:
        kill_group(peer)


def process_table_name(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return None
