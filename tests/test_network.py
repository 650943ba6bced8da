"""Real peers over libp2p on loopback: separate processes, bounded in time, always cleaned up."""

import json
import subprocess
import sys

PEER = [sys.executable, "-m", "peer.cli"]
FAST = ["--rounds", "3", "--local-steps", "2", "--partition", "iid", "--exchange-timeout", "10"]


def run(args, timeout):
    with subprocess.Popen(PEER + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            raise AssertionError(f"{args} did not finish in {timeout} s:\n{out}\n{err}")
        return process.returncode, out, err


def test_a_swarm_of_real_peers_trains_together(tmp_path):
    code, out, err = run(["swarm", "--peers", "3", *FAST, "--out", str(tmp_path)], timeout=240)
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["peers_finished"] == 3 and summary["failed_peers"] == {}
    assert summary["rejected_total"] == 0
    assert summary["missed_exchanges_total"] == 0
    for index in range(3):
        peer = json.loads((tmp_path / f"peer-{index}" / "summary.json").read_text())
        assert len(peer["peers_seen"]) == 3
        assert peer["bytes_sent"] > 0 and peer["bytes_received"] > 0
        assert (tmp_path / f"peer-{index}" / "checkpoint.safetensors").exists()
        lines = (tmp_path / f"peer-{index}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["round"] for line in lines] == [0, 1, 2]


def test_an_unreachable_bootstrap_peer_is_a_clear_error(tmp_path):
    address = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWCX2uwDPc9QjEyGAXQyajsC5xxZMmbjZNrBSiPv5huzdp"
    code, _, err = run(["run", "--initial-peers", address, "--join-timeout", "10", *FAST], timeout=120)
    assert code == 2
    assert "--initial-peers" in err and "Traceback" not in err


def test_a_malformed_bootstrap_address_is_a_clear_error():
    code, _, err = run(["run", "--initial-peers", "not-an-address", *FAST], timeout=120)
    assert code == 2
    assert "multiaddr" in err and "Traceback" not in err


def test_fedavg_is_refused_outside_simulation():
    code, _, err = run(["run", "--algorithm", "fedavg", *FAST], timeout=60)
    assert code == 2 and "simulate" in err
