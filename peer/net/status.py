"""`peer status`: the peers that the DHT knows for a swarm, read by a short-lived DHT client."""

from __future__ import annotations

from hivemind.utils import get_dht_time

from peer.config import ConfigError
from peer.net.membership import Membership, PeerRecord


async def swarm_status(initial_peers: list[str], swarm: str, timeout: float) -> list[dict]:
    """One row per record in the swarm's key: live peers and tombstones of peers that left."""
    import hivemind

    if not initial_peers:
        raise ConfigError("peer status needs --initial-peers: the multiaddrs of any peer or DHT node of the swarm")
    try:
        dht = hivemind.DHT(initial_peers=initial_peers, client_mode=True, start=True, startup_timeout=timeout)
    except Exception as error:
        reason = str(error).replace("\n", " ")
        raise ConfigError(f"could not reach the swarm: {reason}; check --initial-peers") from error
    try:
        membership = Membership(dht, swarm, PeerRecord("", [], "", 0), ttl=timeout)
        await membership.refresh()
        now = get_dht_time()
        return [
            {
                "peer": record.peer_id,
                "round": record.round,
                "state": "left" if record.left else "live",
                "age_seconds": round(now - record.announced, 1) if record.announced else None,
                "expires_in_seconds": round(expiry - now, 1),
                "fingerprint": record.fingerprint,
                "addresses": record.addresses,
            }
            for record, expiry in sorted(membership.seen.values(), key=lambda item: item[0].peer_id)
        ]
    finally:
        dht.shutdown()
