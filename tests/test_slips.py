"""Ordinary slips lose nothing: an --out that holds an earlier run, a port that a running process
holds, and a second Ctrl-C while peers are saving."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from peer.cli import main
from peer.config import SwarmConfig
from peer.net.ports import bind_problem, listen_problem, port_holder
from peer.net.swarm import LocalSwarm
from tests.helpers import FAST, free_port, run, start, stop_all, wait_for_line

SIMULATE = ["simulate", "--peers", "3", "--rounds", "2", "--local-steps", "1", "--partition", "iid"]


def earlier_peer_run(folder):
    """What a killed peer leaves: 30 lines of metrics and its checkpoint."""
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in range(30)))
    (folder / "checkpoint.safetensors").write_bytes(b"checkpoint")
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def test_peer_run_refuses_an_out_that_holds_an_earlier_run_and_leaves_it_untouched(capsys, tmp_path):
    before = earlier_peer_run(tmp_path / "p0")
    assert main(["run", "--out", str(tmp_path / "p0")]) == 2
    error = capsys.readouterr().err
    assert "holds an earlier run" in error and "--resume" in error and "--overwrite" in error
    assert len(error.strip().splitlines()) == 1
    assert {path.name: path.read_bytes() for path in (tmp_path / "p0").iterdir()} == before


def test_resume_and_overwrite_together_are_refused(capsys, tmp_path):
    assert main(["run", "--out", str(tmp_path), "--resume", "--overwrite"]) == 2
    assert "not both" in capsys.readouterr().err


def test_simulate_refuses_its_own_earlier_out_and_replaces_it_with_overwrite(capsys, tmp_path):
    assert main([*SIMULATE, "--out", str(tmp_path)]) == 0
    first = (tmp_path / "summary.json").read_text()
    (tmp_path / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main([*SIMULATE, "--out", str(tmp_path), "--seed", "1"]) == 2
    assert "holds an earlier run (metrics.jsonl, summary.json)" in capsys.readouterr().err
    assert (tmp_path / "summary.json").read_text() == first
    assert main([*SIMULATE, "--out", str(tmp_path), "--seed", "1", "--overwrite"]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["seed"] == 1
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the run's own files are replaced


def test_swarm_refuses_a_folder_whose_peers_hold_an_earlier_run(capsys, tmp_path):
    earlier_peer_run(tmp_path / "peer-1")
    assert main(["swarm", "--peers", "2", "--out", str(tmp_path)]) == 2
    assert "holds an earlier run (peer-1/metrics.jsonl, peer-1/checkpoint.safetensors)" in capsys.readouterr().err


def test_a_swarm_without_out_writes_a_new_folder_each_time():
    description = SwarmConfig.model_fields["out"].description
    assert "default: a new runs/swarm-DATE-TIME" in description


# --- a port in use ------------------------------------------------------------------------


@pytest.fixture
def held_port():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def test_a_port_in_use_names_the_process_that_holds_it(held_port):
    assert bind_problem("127.0.0.1", held_port) == f"port {held_port} is in use by {port_holder(held_port)}"
    assert port_holder(held_port).startswith(f"pid {os.getpid()} (")
    assert listen_problem([f"/ip4/127.0.0.1/tcp/{held_port}"]).startswith(f"cannot listen at /ip4/127.0.0.1/tcp/{held_port}: port")


def test_an_address_of_another_machine_cannot_be_listened_on():
    assert bind_problem("192.0.2.1", 0) == "192.0.2.1 is not an address of this machine"
    assert listen_problem(["/ip4/127.0.0.1/tcp/0"]) is None


def test_peer_run_on_a_port_in_use_is_one_line_naming_its_holder(capsys, held_port):
    assert main(["run", "--host", "127.0.0.1", "--port", str(held_port)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert f"port {held_port} is in use by pid {os.getpid()}" in error and "another --port" in error


# --- a second Ctrl-C ----------------------------------------------------------------------

SLOW_TO_SAVE = """
import signal, sys, time
def save(*_):
    time.sleep(1.5)
    open(sys.argv[1], "w").write("saved")
    sys.exit(0)
signal.signal(signal.SIGINT, save)
print("ready", flush=True)
time.sleep(60)
"""


def test_a_second_ctrl_c_while_the_swarm_stops_lets_every_peer_save(tmp_path):
    swarm = LocalSwarm(SwarmConfig(peers=2, rounds=1), tmp_path)
    for index in range(2):
        swarm.processes[index] = subprocess.Popen(
            [sys.executable, "-c", SLOW_TO_SAVE, str(tmp_path / f"saved-{index}")],
            stdout=subprocess.PIPE, start_new_session=True, text=True,
        )
    for process in swarm.processes.values():
        assert process.stdout.readline().strip() == "ready"
    second_ctrl_c = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    second_ctrl_c.start()
    swarm.stop()  # would raise KeyboardInterrupt and leave the peers unsaved
    second_ctrl_c.join()
    assert [(tmp_path / f"saved-{i}").read_text() for i in range(2)] == ["saved", "saved"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.network
def test_a_second_ctrl_c_to_a_peer_still_writes_its_summary_and_checkpoint(tmp_path):
    out = tmp_path / "p0"
    with open(tmp_path / "log.txt", "w") as log:
        peer = start(["run", *FAST, "--rounds", "1000", "--pace", "0.05", "--out", str(out)], log)
    try:
        wait_for_line(tmp_path / "log.txt", r"round 3/1000", peer, timeout=60)
        os.killpg(peer.pid, signal.SIGINT)
        time.sleep(0.05)
        os.killpg(peer.pid, signal.SIGINT)
        assert peer.wait(timeout=60) == 0, (tmp_path / "log.txt").read_text()
    finally:
        if peer.poll() is None:
            os.killpg(peer.pid, signal.SIGKILL)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] >= 3
    assert (out / "checkpoint.safetensors").exists()


@pytest.mark.network
def test_ctrl_c_while_the_bootstrap_peers_are_tried_again_stops_the_peer_at_once(tmp_path):
    gone = "/ip4/127.0.0.1/tcp/1/p2p/QmRoLN8wFDaK2JbYN19fzCSVPtYHUR464oCRedRggwF3Sj"
    with open(tmp_path / "log.txt", "w") as log:
        peer = start(["run", *FAST, "--initial-peers", gone, "--join-timeout", "120"], log)
    try:
        wait_for_line(tmp_path / "log.txt", r"trying again", peer, timeout=60)
        os.killpg(peer.pid, signal.SIGINT)
        assert peer.wait(timeout=100) == 130
    finally:
        if peer.poll() is None:
            os.killpg(peer.pid, signal.SIGKILL)
    assert "could not start the DHT" not in (tmp_path / "log.txt").read_text()  # it did not wait out --join-timeout


@pytest.mark.network
def test_a_port_that_a_running_peer_holds_names_that_peer(tmp_path):
    port = str(free_port())
    with open(tmp_path / "log.txt", "w") as log:
        first = start(["run", *FAST, "--rounds", "1000", "--pace", "0.05", "--port", port], log)
    try:
        wait_for_line(tmp_path / "log.txt", r"round 1/1000", first, timeout=60)
        code, _, err = run(["run", *FAST, "--port", port], timeout=60)
    finally:
        stop_all([first])
    assert code == 2
    assert f"port {port} is in use by pid " in err and f"started by pid {first.pid} (" in err and " run " in err
