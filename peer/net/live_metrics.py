"""Prometheus metrics of a running peer, served over HTTP at /metrics.

Counters that change with every message (bytes, rejections) are read when a scrape comes; the
rest is updated once per round from the round's record. The HTTP server runs in threads of its
own, so a scrape only reads numbers and never touches the peer's event loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from gossip.transport import REJECTION_REASONS, TrafficCounters
from peer.errors import ConfigError
from peer.metrics import RoundRecord

# Exchange times from a loopback round trip to a neighbour that times out.
EXCHANGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class LiveMetrics(Collector):
    """Serves before the peer has joined (so that a busy port fails fast); ``counters`` and
    ``view_size`` are pointed at the transport and the membership once they exist."""

    def __init__(self, info: dict[str, str]):
        self.counters = TrafficCounters()
        self.view_size: Callable[[], int] = lambda: 0
        self.streams_open: Callable[[], int] = lambda: 0
        self._info = info
        self.registry = CollectorRegistry(auto_describe=False)
        self._exchange_seconds = Histogram(
            "peer_exchange_seconds", "Seconds a round spent exchanging models with the neighbours",
            buckets=EXCHANGE_BUCKETS, registry=self.registry,
        )
        self.registry.register(self)
        self._rounds = 0
        self._round = -1
        self._local_steps = 0
        self._missed = 0
        self._neighbours = 0
        self._accuracy = math.nan
        self._loss = math.nan
        self._tasks = 0
        self._server = None

    def serve(self, host: str, port: int) -> None:
        """Listen at http://host:port/metrics; a port in use is a ConfigError."""
        try:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            raise ConfigError(
                f"--metrics-port {port} on {host} cannot be used ({error.strerror or error}); pick a free port"
            ) from None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def observe(self, record: RoundRecord, neighbours: int, tasks: int = 0) -> None:
        """A round's record, how many in-neighbours the peer has now, and how many tasks are in
        flight on its event loop (counted there: a scrape runs in another thread)."""
        self._rounds += 1
        self._round = record.round
        self._local_steps += record.local_steps
        self._missed += record.neighbours_expected - record.neighbours_heard
        self._neighbours = neighbours
        self._tasks = tasks
        self._exchange_seconds.observe(record.exchange_seconds)
        if record.accuracy is not None:
            self._accuracy, self._loss = record.accuracy, record.loss

    def collect(self) -> Iterator[Metric]:
        counters = self.counters

        def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, documentation, value=value)

        def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, documentation, value=value)

        yield InfoMetricFamily("peer", "What this peer runs", value=self._info)
        yield counter("peer_rounds_completed", "Rounds this peer completed since it started", self._rounds)
        yield gauge("peer_round", "The last round this peer completed (-1: none yet)", self._round)
        yield counter("peer_local_steps", "Local optimisation steps taken", self._local_steps)
        yield counter("peer_bytes_sent", "Bytes sent to other peers (exact wire size)", counters.bytes_sent)
        yield counter("peer_bytes_received", "Bytes received from other peers (exact wire size)", counters.bytes_received)
        rejected = CounterMetricFamily(
            "peer_messages_rejected", "Messages refused before they touched the model, by reason", labels=["reason"]
        )
        for reason in REJECTION_REASONS:
            rejected.add_metric([reason], counters.rejections.get(reason, 0))
        yield rejected
        yield counter("peer_exchanges_missed", "Neighbour models that did not arrive in time", self._missed)
        yield gauge("peer_test_accuracy", "Test accuracy at the last evaluation (NaN before the first)", self._accuracy)
        yield gauge("peer_test_loss", "Mean test loss at the last evaluation (NaN before the first)", self._loss)
        yield gauge("peer_neighbours", "In-neighbours at the end of the last round", self._neighbours)
        yield gauge("peer_view_size", "Live compatible peers in this peer's view, itself included", self.view_size())
        yield gauge("peer_streams_open", "Incoming streams being served now", self.streams_open())
        yield gauge("peer_tasks", "Tasks in flight on the peer's event loop at the end of the last round", self._tasks)
