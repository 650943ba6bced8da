"""Prometheus metrics of a running peer: what a scrape shows, and a busy port."""

import pytest

from peer.config import ConfigError
from peer.metrics import RoundRecord
from peer.net.live_metrics import LiveMetrics
from tests.helpers import free_port, scrape


def record(round_, accuracy, *, expected=2, heard=2, exchange=0.03):
    return RoundRecord(
        round=round_, peer="p", accuracy=accuracy, loss=None if accuracy is None else 0.5, train_loss=1.0,
        bytes_sent=0, bytes_received=0, virtual_time=0.0, neighbours_expected=expected, neighbours_heard=heard,
        rejected=0, local_steps=10, exchange_seconds=exchange,
    )


@pytest.fixture
def live():
    metrics = LiveMetrics({"swarm": "lab", "algorithm": "dpsgd", "task": "mnist1d"})
    port = free_port()
    metrics.serve("127.0.0.1", port)
    yield metrics, port
    metrics.stop()


def test_a_scrape_shows_rounds_traffic_rejections_and_accuracy(live):
    metrics, port = live
    before = scrape(port)
    assert before[("peer_rounds_completed_total", ())] == 0
    assert before[("peer_round", ())] == -1
    assert before[("peer_info", (("algorithm", "dpsgd"), ("swarm", "lab"), ("task", "mnist1d")))] == 1
    metrics.counters.bytes_sent, metrics.counters.bytes_received = 1234, 567
    metrics.counters.reject("malformed")
    metrics.counters.reject("malformed")
    metrics.counters.reject("incompatible")
    metrics.view_size = lambda: 5
    metrics.observe(record(0, None, heard=1, exchange=0.03), neighbours=3)
    metrics.observe(record(1, 0.75, exchange=2.0), neighbours=2)
    after = scrape(port)
    assert after[("peer_rounds_completed_total", ())] == 2
    assert after[("peer_round", ())] == 1
    assert after[("peer_local_steps_total", ())] == 20
    assert after[("peer_bytes_sent_total", ())] == 1234 and after[("peer_bytes_received_total", ())] == 567
    assert after[("peer_messages_rejected_total", (("reason", "malformed"),))] == 2
    assert after[("peer_messages_rejected_total", (("reason", "incompatible"),))] == 1
    assert after[("peer_messages_rejected_total", (("reason", "wrong-sender"),))] == 0
    assert after[("peer_exchanges_missed_total", ())] == 1
    assert after[("peer_test_accuracy", ())] == 0.75 and after[("peer_test_loss", ())] == 0.5
    assert after[("peer_neighbours", ())] == 2 and after[("peer_view_size", ())] == 5
    assert after[("peer_exchange_seconds_count", ())] == 2
    assert after[("peer_exchange_seconds_bucket", (("le", "0.05"),))] == 1
    assert after[("peer_exchange_seconds_bucket", (("le", "2.5"),))] == 2


def test_a_port_in_use_is_a_clear_error(live):
    _, port = live
    with pytest.raises(ConfigError, match=f"--metrics-port {port} on 127.0.0.1 cannot be used .*pick a free port"):
        LiveMetrics({}).serve("127.0.0.1", port)


def test_an_unknown_rejection_reason_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown rejection reason"):
        LiveMetrics({}).counters.reject("because")
