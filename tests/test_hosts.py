"""Peers on emulated hosts: each in a Linux network namespace of its own, on a bridge, started with
the commands docs/real-peers.md gives for several machines (scripts/hosts_swarm.py). Skipped,
with the reason, where namespaces cannot be made (not root, no `ip`, no permission)."""

import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "hosts_swarm.py"
_spec = importlib.util.spec_from_file_location("hosts_swarm", SCRIPT)
hosts_swarm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hosts_swarm)

PROBLEM = hosts_swarm.namespace_problem(rate=True)
needs_namespaces = pytest.mark.skipif(PROBLEM is not None, reason=f"no network namespaces here: {PROBLEM}")

ROUNDS = 3
TRAINING = ["--rounds", str(ROUNDS), "--local-steps", "2", "--partition", "iid", "--exchange-timeout", "10"]


def namespaces(tag: str) -> set[str]:
    """The namespaces of one run of the script (its names start with the run's tag)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.startswith(f"{tag}-")}


def training(log: Path) -> bool:
    """Whether the peer writing ``log`` has finished a round (it then stops on a signal at once)."""
    return log.exists() and "round 1/" in log.read_text()


def processes_mentioning(text: str) -> list[int]:
    """Processes whose command line holds ``text`` (a peer and its DHT process name their --out)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.network
@needs_namespaces
def test_peers_on_separate_hosts_train_to_the_end_and_announce_their_bridge_addresses(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--peers", "3", "--rate", "100", "--out", str(tmp_path), "--timeout", "150",
         "--", *TRAINING],
        check=False, capture_output=True, text=True, timeout=200,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    swarm = report["swarm"]
    assert swarm["all_finished"] and not swarm["timed_out"]
    assert [peer["rounds_completed"] for peer in report["peers"]] == [ROUNDS] * 3
    for peer in report["peers"]:
        assert peer["exit_code"] == 0 and peer["rejected_total"] == 0
        # The first peer listens on 0.0.0.0 by --host, the others by default (their bootstrap peer
        # is on another host): each announces its bridge address, never the loopback.
        assert peer["announced"] and all(f"/ip4/{peer['address']}/tcp/" in a for a in peer["announced"])
        assert not any("/127.0.0.1/" in a for a in peer["announced"])
    assert report["peers"][0]["announced"][0].startswith(f"/ip4/{report['peers'][0]['address']}/tcp/31337/p2p/")
    # Each peer saw the others, through the addresses in their records.
    for index in range(3):
        summary = json.loads((tmp_path / f"peer-{index}" / "summary.json").read_text())
        assert len(summary["peers_seen"]) == 3 and summary["missed_exchanges_total"] == 0
    assert namespaces(swarm["name"]) == set()  # nothing left behind
    assert processes_mentioning(str(tmp_path)) == []


@pytest.mark.network
@needs_namespaces
def test_an_interrupted_run_leaves_no_namespace_and_no_process_behind(tmp_path):
    script = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--peers", "3", "--out", str(tmp_path), "--", "--rounds", "1000", "--partition", "iid"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        # The script names its namespaces once it has made them, then starts the peers.
        tag = re.search(r"in namespaces (\S+)-\*", script.stderr.readline()).group(1)
        assert namespaces(tag) == {f"{tag}-switch", f"{tag}-peer0", f"{tag}-peer1", f"{tag}-peer2"}
        deadline = time.monotonic() + 60
        while not all(training(tmp_path / f"peer-{index}.log") for index in range(3)):
            assert script.poll() is None and time.monotonic() < deadline, script.communicate()
            time.sleep(0.2)
    finally:
        script.send_signal(signal.SIGTERM)  # also where the test failed: the script cleans up
        _, err = script.communicate(timeout=60)
    assert script.returncode == hosts_swarm.INTERRUPTED, err
    assert namespaces(tag) == set()
    assert processes_mentioning(str(tmp_path)) == []


def test_where_namespaces_cannot_be_made_the_script_says_why_and_exits_with_its_own_code(monkeypatch, capsys):
    monkeypatch.setattr(hosts_swarm, "namespace_problem", lambda rate=False: "making network namespaces needs root")
    assert hosts_swarm.main(["--peers", "2"]) == hosts_swarm.NOT_PERMITTED
    assert capsys.readouterr().err.strip() == "hosts_swarm: cannot emulate hosts here: making network namespaces needs root"


def doctor_in(network, index, *flags):
    """`peer doctor` run on host ``index``: (exit code, its lines)."""
    command = ["ip", "netns", "exec", network.host(index), str(hosts_swarm.PEER), "doctor", "--swarm", network.tag, *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    return result.returncode, result.stdout.splitlines()


@pytest.mark.network
@needs_namespaces
def test_the_doctor_on_another_host_finds_a_good_setup_and_a_peer_that_listens_on_its_loopback_only(tmp_path):
    network = hosts_swarm.Network(2, hosts_swarm.random_subnet(), rate=None)
    peers = hosts_swarm.Peers(network, tmp_path, ["--rounds", "100000", "--local-steps", "1", "--pace", "0.2"])
    try:
        network.build()
        peers.start(0, [])
        address = peers.wait_for_address(0, timeout=60)[0]
        code, lines = doctor_in(network, 1, "--initial-peers", address)
        assert code == 0, lines
        assert any(line.startswith("ok: peers can dial this peer: peer ") and f"/ip4/{network.address(1)}/tcp/" in line for line in lines)
        code, lines = doctor_in(network, 1, "--initial-peers", address, "--host", "127.0.0.1")
        assert code == 1
        assert any(line.startswith("problem: this peer listens only on the loopback") and "--host 0.0.0.0" in line for line in lines)
    finally:
        peers.stop()
        network.remove()
