"""The real world: hivemind's DHT and libp2p streams, and the wall clock.

- ``node.py``: ``peer run``: one real peer that joins or starts a swarm, trains, gossips and leaves cleanly.
- ``swarm.py``: ``peer swarm``: N real peer processes on this host over loopback, and their summary.
- ``status.py``: ``peer status``: the peers the DHT knows for a swarm, read by a short-lived client.
- ``doctor.py``: ``peer doctor``: would ``peer run`` with these settings join its swarm; one line per check.
- ``dialback.py``: a service every reachable peer serves: it dials a requester's ports back at the stream's own IP.
- ``membership.py``: swarm membership in the DHT: owner-signed records, refreshed, read into a view.
- ``access.py``: identities, swarm keys, per-stream proofs of the key, and lists of allowed peers.
- ``transport.py``: the Transport over libp2p streams, with the sender authenticated per stream.
- ``stream_limits.py``: what incoming streams may cost: caps, deadlines, a byte budget, strikes.
- ``ports.py``: whether a TCP port can be listened on, and which process holds it when it cannot.
- ``clock.py``: the wall clock, with local work in a worker thread so the peer keeps serving.
- ``live_metrics.py``: Prometheus metrics of a running peer, served over HTTP at /metrics.
- ``averaging.py``: averaging in groups through hivemind's all-reduce, each group's members checked against the swarm.
- ``reaper.py``: a watcher process that kills a peer's DHT and p2p processes once the peer is gone.
"""
