"""Real peers over libp2p on loopback: separate processes, bounded in time, always cleaned up."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peer.runs import load_run
from tests.helpers import FAST, free_port, run, scrape, start, stop_all, wait_for_line

pytestmark = pytest.mark.network


@pytest.mark.parametrize(
    "codec, error_feedback, algorithm",
    [
        ("none", "none", ["--algorithm", "dpsgd", "--client-peers", "1"]),
        ("int8", "choco", ["--algorithm", "dpsgd"]),
        ("none", "none", ["--algorithm", "dfedsam", "--gossip-steps", "2", "--mixing", "variance-corrected", "--init", "independent"]),
    ],
    ids=["dpsgd-one-peer-in-client-mode", "dpsgd-int8-choco", "dfedsam-mgs-variance-corrected"],
)
def test_a_swarm_of_real_peers_trains_together(tmp_path, codec, error_feedback, algorithm):
    base_port = free_port()
    code, _, err = run(
        ["swarm", "--peers", "3", *FAST, *algorithm, "--codec", codec, "--out", str(tmp_path),
         "--target-accuracy", "0.01", "--metrics-port", str(base_port)], timeout=240
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["target_accuracy"] == 0.01 and summary["rounds_to_target"] == 1
    assert 0 < summary["bytes_to_target"] <= summary["bytes_sent_total"] and summary["wall_seconds_to_target"] > 0
    assert summary["peers_finished"] == 3 and summary["failed_peers"] == {}
    assert summary["rejected_total"] == 0
    assert summary["missed_exchanges_total"] == 0
    assert summary["consensus_distance"] >= 0 and not summary["interrupted"]
    peers = [json.loads((tmp_path / f"peer-{index}" / "summary.json").read_text()) for index in range(3)]
    clients = [peer["peer"] for peer in peers if peer["client_mode"]]
    assert len(clients) == ("--client-peers" in algorithm)
    # Every peer heard every neighbour every round (missed_exchanges_total above): a peer in client
    # mode pulled its neighbours' models, and nobody tried to dial it.
    assert not any(client in peer["failed_dials"] for client in clients for peer in peers)
    for client in (peer for peer in peers if peer["client_mode"]):
        others = [peer["mean_accuracy"] for peer in peers if not peer["client_mode"]]
        assert abs(client["mean_accuracy"] - sum(others) / len(others)) <= 0.03
    for index, peer in enumerate(peers):
        assert len(peer["peers_seen"]) == 3
        assert (peer["codec"], peer["error_feedback"], peer["algorithm"]) == (codec, error_feedback, algorithm[1])
        assert peer["bytes_sent_total"] > 0 and peer["bytes_received_total"] > 0
        assert (tmp_path / f"peer-{index}" / "checkpoint.safetensors").exists()
        log = (tmp_path / f"peer-{index}" / "log.txt").read_text()
        assert f"metrics at http://127.0.0.1:{base_port + index}/metrics" in log
        lines = (tmp_path / f"peer-{index}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["round"] for line in lines] == [0, 1, 2]


@pytest.mark.parametrize("mode", [[], ["--client-mode"]], ids=["reachable", "client-mode"])
def test_an_unreachable_bootstrap_peer_is_a_clear_error(tmp_path, mode):
    address = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWCX2uwDPc9QjEyGAXQyajsC5xxZMmbjZNrBSiPv5huzdp"
    code, _, err = run(["run", "--initial-peers", address, "--join-timeout", "1", *mode, *FAST], timeout=120)
    assert code == 2
    assert "--initial-peers" in err and "Traceback" not in err


def test_a_malformed_bootstrap_address_is_a_clear_error():
    code, _, err = run(["run", "--initial-peers", "not-an-address", *FAST], timeout=120)
    assert code == 2
    assert "multiaddr" in err and "Traceback" not in err


def test_fedavg_is_refused_outside_simulation():
    code, _, err = run(["run", "--algorithm", "fedavg", *FAST], timeout=60)
    assert code == 2 and "simulate" in err


def test_peers_join_a_swarm_whose_only_bootstrap_node_is_a_plain_hivemind_dht(tmp_path):
    processes = []
    try:
        with open(tmp_path / "dht.log", "w") as log:
            dht = subprocess.Popen(
                [str(Path(sys.executable).parent / "hivemind-dht"), "--host_maddrs", "/ip4/127.0.0.1/tcp/0"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        processes.append(dht)
        address = wait_for_line(tmp_path / "dht.log", r"--initial_peers (\S+)", dht, timeout=60).group(1)
        for shard in range(2):
            with open(tmp_path / f"peer-{shard}.log", "w") as log:
                processes.append(start([
                    "run", "--initial-peers", address, "--swarm", "via-dht", "--shard", str(shard), "--shards", "2",
                    "--min-peers", "2", "--join-timeout", "60", "--out", str(tmp_path / f"peer-{shard}"), *FAST,
                ], log))
        for peer in processes[1:]:
            assert peer.wait(timeout=180) == 0, (tmp_path / "peer-0.log").read_text()
        code, out, err = run(["status", "--initial-peers", address, "--swarm", "via-dht", "--json"], timeout=120)
        assert code == 0, err
        status = json.loads(out)
        assert [row["state"] for row in status["peers"]] == ["left", "left"]  # both withdrew on leaving
        assert all(0 <= row["accuracy"] <= 1 for row in status["peers"])  # each announced its last evaluation
        assert status["summary"]["live_peers"] == 0 and status["summary"]["left_peers"] == 2
    finally:
        stop_all(processes)
    for shard in range(2):
        summary = json.loads((tmp_path / f"peer-{shard}" / "summary.json").read_text())
        assert summary["rounds_completed"] == 3
        assert len(summary["peers_seen"]) == 2  # each other; the DHT node is not a peer
        assert summary["bytes_received_total"] > 0 and summary["missed_exchanges_total"] == 0


def test_survivors_go_on_after_crashes_a_killed_peer_resumes_and_a_newcomer_catches_up(tmp_path):
    # Peers take seconds to start on a loaded 2-core host: the swarm must still be running when
    # the returning peer and the newcomer are ready (50 rounds of at least 0.6 s after they start).
    script = Path(__file__).resolve().parents[1] / "scripts" / "churn_swarm.py"
    result = subprocess.run(
        [sys.executable, str(script), "--peers", "4", "--rounds", "60", "--local-steps", "10", "--partition", "iid",
         "--kill", "2", "--resume", "1", "--kill-at", "6", "--join-at", "10", "--pace", "0.6", "--record-ttl", "4",
         "--exchange-timeout", "3", "--timeout", "240", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["survivors_finished_every_round"], report
    assert report["survivor_exit_codes"] == [0, 0]
    (back,) = report["resumed"]
    assert back["exit_code"] == 0 and back["rounds_completed"] == 60
    assert back["resumed_from_round"] >= report["killed_at_round"] - 1  # from its last checkpoint, not from 0
    assert abs(back["accuracy_final"] - report["survivor_accuracy_final_mean"]) <= 0.03, report
    (newcomer,) = report["newcomers"]
    assert newcomer["exit_code"] == 0
    assert newcomer["first_round"] >= 10  # it started from the swarm's round, not from 0
    assert abs(newcomer["accuracy_final"] - report["survivor_accuracy_final_mean"]) < 0.15


def test_ctrl_c_saves_withdraws_and_exits_0_and_a_live_identity_is_refused(tmp_path):
    with open(tmp_path / "peer.log", "w") as log:
        peer = start(["run", "--identity", str(tmp_path / "key"), "--rounds", "100", "--pace", "0.5",
                      "--partition", "iid", "--out", str(tmp_path / "out")], log)
    try:
        wait_for_line(tmp_path / "peer.log", r"round 2/100", peer, timeout=120)
        code, _, err = run(["run", "--identity", str(tmp_path / "key"), *FAST], timeout=60)
        assert code == 2 and "in use by a running peer" in err
        os.killpg(peer.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole process group
        assert peer.wait(timeout=60) == 0, (tmp_path / "peer.log").read_text()
    finally:
        stop_all([peer])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert 2 <= summary["rounds_completed"] < 100
    assert (tmp_path / "out" / "checkpoint.safetensors").exists()
    assert "Traceback" not in (tmp_path / "peer.log").read_text()


def test_a_running_peer_serves_live_metrics_and_shows_in_status(tmp_path):
    port = free_port()
    with open(tmp_path / "peer.log", "w") as log:
        peer = start(["run", "--rounds", "200", "--pace", "0.3", "--partition", "iid", "--record-ttl", "4",
                      "--metrics-port", str(port), "--target-accuracy", "0.99", "--out", str(tmp_path / "out")], log)
    try:
        address = wait_for_line(tmp_path / "peer.log", r"--initial-peers (\S+)", peer, timeout=120).group(1)
        wait_for_line(tmp_path / "peer.log", r"round 2/200", peer, timeout=120)
        first = scrape(port)
        deadline = time.monotonic() + 60
        while (second := scrape(port))[("peer_rounds_completed_total", ())] <= first[("peer_rounds_completed_total", ())]:
            assert time.monotonic() < deadline, "peer_rounds_completed_total did not rise"
            time.sleep(0.5)
        assert second[("peer_local_steps_total", ())] > first[("peer_local_steps_total", ())]
        assert 0 <= second[("peer_test_accuracy", ())] <= 1 and second[("peer_view_size", ())] == 1
        code, out, err = run(["status", "--initial-peers", address, "--json"], timeout=120)
        assert code == 0, err
        (row,) = json.loads(out)["peers"]
        assert row["state"] == "live" and row["round"] >= 1 and 0 <= row["accuracy"] <= 1 and row["loss"] > 0
        with open(tmp_path / "watch.log", "w") as log:
            watch = start(["status", "--initial-peers", address, "--json", "--watch", "1"], log)
        try:
            wait_for_line(tmp_path / "watch.log", r"(?s)\{.*\n.*\{.*\n", watch, timeout=120)  # two refreshes
            os.killpg(watch.pid, signal.SIGINT)
            assert watch.wait(timeout=60) == 0
        finally:
            stop_all([watch])
        refreshes = [json.loads(line) for line in (tmp_path / "watch.log").read_text().splitlines() if line.startswith("{")]
        assert len(refreshes) >= 2 and all(r["summary"]["live_peers"] == 1 for r in refreshes)
        assert refreshes[-1]["summary"]["fastest_round"] >= refreshes[0]["summary"]["fastest_round"]
        os.killpg(peer.pid, signal.SIGINT)
        assert peer.wait(timeout=60) == 0, (tmp_path / "peer.log").read_text()
    finally:
        stop_all([peer])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["target_accuracy"] == 0.99 and summary["rounds_to_target"] is None
    assert summary["wall_seconds_to_target"] is None and "virtual_seconds_to_target" not in summary
    own = load_run(tmp_path / "out")  # what peer plot reads: the peer's own curve, in wall-clock seconds
    assert own.wall_clock and len(own.points) == summary["rounds_completed"]
    assert all(0 < a.seconds < b.seconds for a, b in zip(own.points, own.points[1:]))


def test_a_metrics_port_in_use_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, _, err = run(["run", "--metrics-port", str(busy.getsockname()[1]), *FAST], timeout=60)
    assert code == 2 and "--metrics-port" in err and "pick a free port" in err and "Traceback" not in err
