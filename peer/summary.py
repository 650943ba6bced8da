"""A run's summary: one shape for ``peer simulate``, ``peer run`` and ``peer swarm``.

The same figure has the same key in all three: a peer's own run is a swarm of one, whose mean
accuracy is its accuracy and whose totals are its own. What a protocol adds (its settings and
figures) comes from the protocol; what only one command measures (simulated seconds, a peer's
id, failed peers) is added by that command beside these.
"""

from __future__ import annotations

from typing import Any

from peer.config import TrainingConfig

# Keys that earlier versions wrote in a peer's summary, and the keys that hold those figures now.
RENAMED = {
    "accuracy": "mean_accuracy",
    "loss": "mean_loss",
    "bytes_sent": "bytes_sent_total",
    "bytes_received": "bytes_received_total",
    "rejected": "rejected_total",
    "missed_exchanges": "missed_exchanges_total",
}


def summary(
    config: TrainingConfig, *, peers: int, rounds_completed: int, accuracies: list[float], losses: list[float],
    bytes_sent: int, bytes_received: int | None, rejected: int, missed_exchanges: int, local_steps: int,
    wall_seconds: float, to_target: dict[str, Any], spectral_gap: float | None = None,
) -> dict[str, Any]:
    """The figures every run reports, in the order tables show them, then the protocol's settings."""
    protocol = config.protocol
    common = {
        "algorithm": config.algorithm,
        "label": protocol.label or protocol.name,
        "task": config.task,
        "topology": protocol.overlay or config.topology,
        "spectral_gap": spectral_gap,
        "partition": config.partition,
        "peers": peers,
        "rounds": config.rounds,
        "rounds_completed": rounds_completed,
        "local_steps": f"adaptive:{config.local_steps}" if config.adaptive_steps else config.local_steps,
        "seed": config.seed,
        "init": config.init,
        "mixing": config.mixing,
        "codec": config.gossip.codec.spec,
        "error_feedback": config.error_feedback_spec,
        "sam_rho": config.sharpness_radius() or None,
        "mean_accuracy": _mean(accuracies),
        "min_accuracy": min(accuracies, default=None),
        "max_accuracy": max(accuracies, default=None),
        "mean_loss": _mean(losses),
        "bytes_sent_total": bytes_sent,
        "bytes_received_total": bytes_received,
        "rejected_total": rejected,
        "missed_exchanges_total": missed_exchanges,
        "local_steps_total": local_steps,
        "wall_seconds": wall_seconds,
        **to_target,
    }
    return common | {name: value for name, value in protocol.options(config).items() if name not in common}


def renamed(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary read back from a run folder, its keys as they are named now."""
    return {RENAMED.get(key, key): value for key, value in summary.items() if not (key in RENAMED and RENAMED[key] in summary)}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
