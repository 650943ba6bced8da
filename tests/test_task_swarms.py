"""The image and language tasks between real peers: a swarm of four processes trains each on small
files written here, in the layouts the loaders read."""

import json
from pathlib import Path

import pytest

from tests.helpers import run
from tests.test_cifar10 import write_jpeg_tarball
from tests.test_shakespeare import TEXT

pytestmark = pytest.mark.network


def write_cifar10(data_dir: Path) -> list[str]:
    write_jpeg_tarball(data_dir / "cifar10")
    return ["--task", "cifar10", "--partition", "iid", "--batch-size", "8"]


def write_shakespeare(data_dir: Path) -> list[str]:
    (data_dir / "tinyshakespeare").mkdir(parents=True)
    (data_dir / "tinyshakespeare" / "input.txt").write_text(TEXT, encoding="utf-8")
    return ["--task", "shakespeare", "--partition", "natural", "--batch-size", "4"]


@pytest.mark.parametrize(
    "write, optimizer", [(write_cifar10, "sgd"), (write_shakespeare, "adamw")], ids=["cifar10", "shakespeare"]
)
def test_a_swarm_of_four_real_peers_trains_each_real_task(tmp_path, monkeypatch, write, optimizer):
    monkeypatch.setenv("PEER_CACHE_DIR", str(tmp_path / "cache"))  # the peers' processes inherit it
    task = write(tmp_path / "data")
    code, _, err = run(
        ["swarm", "--peers", "4", *task, "--data-dir", str(tmp_path / "data"), "--rounds", "2", "--local-steps", "2",
         "--exchange-timeout", "20", "--out", str(tmp_path / "out")],
        timeout=300,
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["peers_finished"] == 4 and summary["failed_peers"] == {}
    assert summary["missed_exchanges_total"] == 0 and summary["rejected_total"] == 0
    peers = [json.loads((tmp_path / "out" / f"peer-{index}" / "summary.json").read_text()) for index in range(4)]
    for peer in peers:
        assert peer["task"] == task[1] and peer["bytes_received_total"] > 0
        assert peer["mean_loss"] > 0 and 0 <= peer["mean_accuracy"] <= 1
    log = (tmp_path / "out" / "peer-0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in log] == [0, 1]
    assert [peer["optimizer"] for peer in peers] == [optimizer] * 4
