"""What travels between peers and how it is mixed: messages, transports, mixing rules, protocols.

- ``adaptive_steps.py``: local steps per iteration in proportion to a peer's measured speed.
- ``catchup.py``: a joining peer pulls a running swarm's current model and round.
- ``choco.py``: CHOCO-gossip and EControl error feedback with per-link versioned copies.
- ``codecs.py``: compression codecs (fp16, bf16, block int8, top-k, random-k, compositions), validated on decode.
- ``conversation.py``: a protocol's sends and requests within a timeout, counted refusals, and tasks that end with its run.
- ``exchange.py``: one gossip step with the neighbours: send, collect within a timeout, mix.
- ``greeting.py``: the hello, welcome and goodbye that gossiping neighbours share.
- ``learner.py``: what a protocol needs from the model it trains (local steps, a state to share).
- ``message.py``: a message (header and tensors) and its exact size on the wire.
- ``mixing.py``: mixing rules, and the plain weighted average.
- ``model_codec.py``: a whole model as one flat vector for a codec.
- ``neighbourhood.py``: whom a peer talks to and with what weight: a fixed graph, a live overlay or random groups.
- ``robust.py``: robust mixing rules (clipping, trimmed mean, median) and the outlier guard.
- ``sampling.py``: hash order and finding live peers by ping, for decentralised sampling.
- ``settings.py``: timeout, codec, error feedback, mixing rule and staleness, and the exchange they make.
- ``token.py``: a walking token as data: its wire form, its checks, and which copy is current.
- ``transport.py``: the Transport and Clock interfaces every protocol is written against.
- ``averaging.py``: averaging in groups (an all-reduce), the interface each world implements.
- ``outer.py``: the outer optimiser of outer-optimizer training, its fragments, and the error feedback of its pseudo-gradients.
- ``validation.py``: checks that a received state matches our model (names, shapes, dtypes, finite).
- ``variance.py``: variance-corrected averaging.
- ``view.py``: a sampling peer's view of the swarm, merged from every message, and its wire form.
- ``wait_free.py``: gossip without rounds: outboxes that never wait, cached neighbour models, staleness weights.
- ``wire.py``: the wire format (length-prefixed msgpack header, raw tensor bytes), checked before allocation.
- ``protocols/``: one file per training protocol.
"""
