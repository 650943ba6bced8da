"""`peer status`: the peers that the DHT knows for a swarm, read by a short-lived DHT client."""

from __future__ import annotations

import statistics
from typing import Any

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from peer.errors import ConfigError
from peer.net.access import PUBLIC, Access
from peer.net.membership import Membership, PeerRecord, children_ignore_ctrl_c


def connect(initial_peers: list[str], timeout: float) -> hivemind.DHT:
    """A DHT client (it stores nothing and accepts no connections) joined through ``initial_peers``."""
    if not initial_peers:
        raise ConfigError("peer status needs --initial-peers: the multiaddrs of any peer or DHT node of the swarm")
    try:
        with children_ignore_ctrl_c():  # Ctrl-C ends --watch; this process then shuts the DHT down
            return hivemind.DHT(
                initial_peers=initial_peers, client_mode=True, start=True, startup_timeout=timeout,
                record_validators=[RSASignatureValidator()],  # so that forged records are dropped as peers drop them
            )
    except Exception as error:
        reason = str(error).replace("\n", " ")
        raise ConfigError(f"could not reach the swarm: {reason}; check --initial-peers") from error


async def swarm_status(dht: hivemind.DHT, swarm: str, timeout: float, access: Access = PUBLIC) -> dict[str, Any]:
    """The swarm in one line (``summary``) and one row per record in its key (``peers``): live
    peers and tombstones of peers that left. A private swarm's records are found and shown only
    with its key."""
    membership = Membership(dht, swarm, PeerRecord("", [], "", 0), ttl=timeout, access=access)
    await membership.refresh()
    now = get_dht_time()
    rows = [
        {
            "peer": record.peer_id,
            "round": record.round,
            "accuracy": record.accuracy,
            "loss": record.loss,
            "state": "left" if record.left else "live",
            "age_seconds": round(now - record.announced, 1) if record.announced else None,
            "expires_in_seconds": round(expiry - now, 1),
            "fingerprint": record.fingerprint,
            "addresses": record.addresses,
        }
        for record, expiry in sorted(membership.seen.values(), key=lambda item: item[0].peer_id)
    ]
    return {"swarm": swarm, "summary": summarise(rows), "peers": rows, "records_ignored": dict(membership.rejected)}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    rounds = sorted(row["round"] for row in rows if row["state"] == "live")
    return {
        "live_peers": len(rounds),
        "left_peers": len(rows) - len(rounds),
        "slowest_round": rounds[0] if rounds else None,
        "median_round": statistics.median_low(rounds) if rounds else None,
        "fastest_round": rounds[-1] if rounds else None,
    }
