"""`peer status` shows each peer's test loss beside its accuracy, from the record it announces."""

import io

from rich.console import Console

from peer.cli import _status_table
from peer.net.membership import Membership, PeerRecord

RECORD = {"peer_id": "p", "addresses": [], "fingerprint": "abc", "round": 3, "accuracy": 0.75, "loss": 0.5}


def test_a_record_carries_the_test_loss_of_the_peers_last_evaluation():
    assert PeerRecord.parse("p", RECORD).loss == 0.5
    membership = Membership(None, "swarm", PeerRecord("me", [], "abc", 0), ttl=10)
    membership.evaluated(0.8, 0.25)
    assert (membership.record.accuracy, membership.record.loss) == (0.8, 0.25)
    assert PeerRecord.parse("me", {**RECORD, "peer_id": "me", "loss": membership.record.loss}).loss == 0.25


def test_a_record_without_a_loss_or_with_a_negative_or_not_finite_one_has_none():
    without = {key: value for key, value in RECORD.items() if key != "loss"}  # a peer of an earlier version
    assert PeerRecord.parse("p", without).loss is None and PeerRecord.parse("p", without).accuracy == 0.75
    for bad in (-1.0, float("nan"), float("inf")):
        record = PeerRecord.parse("p", {**RECORD, "loss": bad})
        assert record.loss is None and record.accuracy == 0.75
    assert PeerRecord.parse("p", {**RECORD, "loss": "high"}) is None  # malformed, as a bad accuracy is


def test_the_status_table_shows_each_peers_accuracy_and_loss():
    row = {"peer": "p", "round": 3, "state": "live", "age_seconds": 1.0, "addresses": ["/ip4/127.0.0.1/tcp/1"]}
    status = {
        "swarm": "lab",
        "summary": {"live_peers": 2, "slowest_round": 3, "median_round": 3, "fastest_round": 3},
        "peers": [{**row, "accuracy": 0.75, "loss": 0.5}, {**row, "peer": "q", "accuracy": None, "loss": None}],
    }
    console = Console(record=True, width=160, file=io.StringIO())
    console.print(_status_table(status))
    lines = console.export_text().splitlines()
    (header,) = [[cell.strip() for cell in line.split("┃")[1:-1]] for line in lines if line.startswith("┃")]
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
    assert header[:5] == ["peer", "round", "accuracy", "loss", "state"]
    assert [row[:5] for row in rows] == [["p", "3", "0.7500", "0.5000", "live"], ["q", "3", "-", "-", "live"]]
