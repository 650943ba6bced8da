"""Compressed gossip: codecs in the exchange, CHOCO with per-link copies, EControl, and bad input."""

import asyncio

import numpy as np
import pytest
import torch

from gossip.choco import CHOCO, RESYNC, ChocoExchange, default_consensus_step, parse_error_feedback
from gossip.codecs import parse_codec
from gossip.exchange import MODEL, NeighbourExchange
from gossip.message import Message
from gossip.neighbourhood import GraphNeighbourhood, OverlayNeighbourhood
from gossip.settings import GossipSettings
from peer.sim import LinkModel, SimClock, SimNetwork
from tests.sim_swarm import build_gossip, run
from topology import parse_topology


def gossip_run(spec, x0, rounds, settings, network=None):
    """D-PSGD without training (pure gossip) on ``spec``; returns the final vectors and the network."""
    topology = parse_topology(spec, x0.shape[0])
    network, _, learners, protocols, _ = build_gossip(topology, x0, settings=settings, network=network or SimNetwork())

    async def main():
        await asyncio.gather(*(p.run(rounds) for p in protocols))

    run(main())
    return torch.stack([learner.value for learner in learners]), network, protocols, topology


def spread(x: torch.Tensor) -> float:
    return float(((x - x.mean(0)) ** 2).sum() / x.shape[0])


X0 = torch.randn(8, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_choco_with_a_lossless_codec_is_plain_gossip():
    rounds = 6
    final, _, _, topology = gossip_run("ring", X0, rounds, GossipSettings(codec="none", error_feedback="choco"))
    expected = X0.numpy()
    for r in range(rounds):
        expected = topology.mixing_matrix(r) @ expected
    np.testing.assert_allclose(final.numpy(), expected, atol=1e-9)


@pytest.mark.parametrize("codec", ["topk:0.05", "randk:0.1", "topk:0.1+int8", "int8:64", "fp16"])
def test_choco_preserves_the_average_and_reaches_consensus(codec):
    step = 0.05 if codec.startswith(("topk", "randk")) else 1.0
    final, _, _, _ = gossip_run("ring", X0, 150, GossipSettings(codec=codec, error_feedback="choco", consensus_step=step))
    # The pair terms of each link cancel: the average moves only by float rounding.
    torch.testing.assert_close(final.mean(0), X0.mean(0), atol=1e-9, rtol=0)
    assert spread(final) < 0.2 * spread(X0)


def test_econtrol_with_a_small_eta_reaches_consensus():
    final, _, _, _ = gossip_run("ring", X0, 150, GossipSettings(codec="topk:0.05", error_feedback="econtrol:0.02", consensus_step=0.05))
    torch.testing.assert_close(final.mean(0), X0.mean(0), atol=1e-9, rtol=0)
    assert spread(final) < 0.2 * spread(X0)


def test_top_k_without_error_feedback_loses_what_it_drops():
    settings = GossipSettings(codec="topk:0.05", error_feedback="none")
    final, _, _, _ = gossip_run("ring", X0, 40, settings)
    # Mixing sparse models shrinks every peer towards zero instead of towards the average.
    assert float(final.norm(dim=1).mean()) < 0.5 * float(X0.norm(dim=1).mean())


def test_compression_cuts_the_bytes_sent():
    _, plain, _, _ = gossip_run("ring", X0, 10, GossipSettings())
    _, sparse, _, _ = gossip_run("ring", X0, 10, GossipSettings(codec="topk:0.05", error_feedback="choco", consensus_step=0.05))
    def sent(network):
        return sum(t.counters.bytes_sent for t in network._endpoints.values())

    assert sent(sparse) < sent(plain) / 4


def test_lossy_links_resync_with_full_copies_and_still_converge():
    network = SimNetwork(LinkModel(latency=0.01, loss=0.2), seed=3)
    settings = GossipSettings(timeout=1.0, codec="topk:0.1", error_feedback="choco", consensus_step=0.05)
    final, _, protocols, _ = gossip_run("ring", X0, 200, settings, network)
    assert spread(final) < 0.2 * spread(X0)
    assert bool(torch.isfinite(final).all())
    for protocol in protocols:
        exchange = protocol.exchange
        assert set(exchange.out_links) <= exchange.neighbourhood.linked(0)


class Pair:
    """Two CHOCO exchanges on a simulated link, stepped by hand."""

    def __init__(self, codec="topk:0.5", view=None, size=8):
        self.network = SimNetwork()
        self.clock = SimClock()
        self.ids = ["a", "b"]
        view = view or (lambda: self.ids)
        self.transports = {peer: self.network.attach(peer) for peer in self.ids}
        self.exchanges = {
            peer: ChocoExchange(
                self.transports[peer], self.clock, OverlayNeighbourhood("ring", peer, view),
                {"x": torch.zeros(size)}, timeout=1.0, codec=parse_codec(codec), consensus_step=0.5,
            )
            for peer in self.ids
        }

    def step(self, step, values):
        async def both():
            return await asyncio.gather(*(
                self.exchanges[peer].step(step, {"x": values[peer]}) for peer in self.ids
            ))

        return run(both())

    def request(self, sender, message):
        async def send():
            return await self.transports[sender].request("b" if sender == "a" else "a", message, timeout=1.0)

        return run(send())


def test_a_new_link_starts_with_a_full_copy_then_sends_deltas():
    pair = Pair(codec="topk:0.05", size=1024)
    values = {"a": torch.arange(1024.0), "b": torch.zeros(1024)}
    pair.step(0, values)
    a_to_b = pair.exchanges["a"].out_links["b"]
    b_from_a = pair.exchanges["b"].in_links["a"]
    assert a_to_b.version == b_from_a.version
    torch.testing.assert_close(a_to_b.copy, b_from_a.copy)  # the int8 full copy, the same at both ends
    sent_full = pair.transports["a"].counters.bytes_sent
    pair.step(1, values)
    assert pair.exchanges["a"].out_links["b"].version == pair.exchanges["b"].in_links["a"].version
    assert pair.transports["a"].counters.bytes_sent - sent_full < sent_full  # a delta is smaller


def test_a_delta_for_another_version_gets_resync_and_a_full_copy_repairs_it():
    pair = Pair()
    values = {"a": torch.arange(8.0), "b": torch.zeros(8)}
    pair.step(0, values)
    b_copy = pair.exchanges["b"].in_links["a"]
    stale = Message(
        CHOCO, "a", 1, {"indices": torch.tensor([0], dtype=torch.int32), "values": torch.tensor([5.0])},
        meta={"seed": 1, "version": 99, "base": b_copy.version - 1}, codec="topk:0.125",
    )
    assert pair.request("a", stale).meta["status"] == RESYNC
    assert pair.exchanges["b"].in_links["a"] is b_copy  # untouched
    # The sender's link was told nothing here; forget b's copy to mimic a restarted neighbour.
    del pair.exchanges["b"].in_links["a"]
    pair.step(1, values)
    assert pair.exchanges["a"].out_links["b"].version == pair.exchanges["b"].in_links["a"].version


@pytest.mark.parametrize(
    "tensors, meta, codec",
    [
        ({"indices": torch.tensor([3, 8], dtype=torch.int32), "values": torch.tensor([1.0, 2.0])}, {}, "topk:0.25"),
        ({"indices": torch.tensor([5, 2], dtype=torch.int32), "values": torch.tensor([1.0, 2.0])}, {}, "topk:0.25"),
        ({"indices": torch.tensor([1, 2, 3], dtype=torch.int32), "values": torch.tensor([1.0, 2.0, 3.0])}, {}, "topk:0.25"),
        ({"indices": torch.tensor([1, 2], dtype=torch.int32), "values": torch.tensor([1.0, float("nan")])}, {}, "topk:0.25"),
        ({"values": torch.ones(8)}, {}, "zip:9"),
        ({"values": torch.ones(8)}, {"seed": "x"}, "none"),
        ({"values": torch.ones(8, dtype=torch.float64)}, {}, "none"),
    ],
    ids=["index-out-of-range", "unsorted-indices", "too-many-values", "nan", "unknown-codec", "bad-seed", "wrong-dtype"],
)
def test_malformed_deltas_are_rejected_and_change_nothing(tensors, meta, codec):
    pair = Pair()
    values = {"a": torch.arange(8.0), "b": torch.zeros(8)}
    pair.step(0, values)
    before = pair.exchanges["b"].in_links["a"]
    message = Message(
        CHOCO, "a", 1, tensors, meta={"seed": 1, "version": 50, "base": before.version, **meta}, codec=codec
    )
    assert pair.request("a", message).meta["status"] == RESYNC
    assert pair.transports["b"].counters.rejected == 1
    assert pair.exchanges["b"].in_links["a"] is before


def test_a_departed_neighbours_link_state_is_freed():
    view = ["a", "b"]
    pair = Pair(view=lambda: view)
    values = {"a": torch.arange(8.0), "b": torch.zeros(8)}
    pair.step(0, values)
    assert "b" in pair.exchanges["a"].out_links and "b" in pair.exchanges["a"].in_links
    view.remove("b")

    async def alone():
        return await pair.exchanges["a"].step(1, {"x": values["a"]})

    result = run(alone())
    assert pair.exchanges["a"].out_links == {} and pair.exchanges["a"].in_links == {}
    torch.testing.assert_close(result.state["x"], values["a"])  # alone, a peer keeps its model


def test_an_unlinked_sender_gets_no_copy():
    pair = Pair()
    outsider = pair.network.attach("z")
    full = Message(CHOCO, "z", 0, {"values": torch.ones(8)}, meta={"seed": 0, "version": 1, "full": True})

    async def send():
        return await outsider.request("a", full, timeout=1.0)

    assert run(send()).meta["status"] == RESYNC
    assert "z" not in pair.exchanges["a"].in_links


def test_a_compressed_model_without_error_feedback_is_decoded_and_mixed():
    network, clock = SimNetwork(), SimClock()
    topology = parse_topology("complete", 2)
    exchanges = {
        peer: NeighbourExchange(
            network.attach(peer), clock, GraphNeighbourhood(topology, ["a", "b"], peer),
            {"x": torch.zeros(512)}, timeout=1.0, codec=parse_codec("int8"),
        )
        for peer in ["a", "b"]
    }
    values = {"a": torch.linspace(-1, 1, 512), "b": torch.zeros(512)}

    async def both():
        return await asyncio.gather(*(exchanges[p].step(0, {"x": values[p]}) for p in ["a", "b"]))

    result_a, result_b = run(both())
    torch.testing.assert_close(result_b.state["x"], values["a"] / 2, atol=1 / 254, rtol=0)
    torch.testing.assert_close(result_a.state["x"], values["a"] / 2)


@pytest.mark.parametrize(
    "tensors, codec, meta",
    [
        ({"indices": torch.tensor([7, 600], dtype=torch.int32), "values": torch.ones(2)}, "topk:0.003", {"seed": 0}),
        ({"values": torch.ones(512)}, "int9", {"seed": 0}),
        ({"values": torch.ones(512, dtype=torch.float16)}, "fp16", {}),
    ],
    ids=["index-out-of-range", "unknown-codec", "no-seed"],
)
def test_a_malformed_compressed_model_is_rejected(tensors, codec, meta):
    network, clock = SimNetwork(), SimClock()
    exchange = NeighbourExchange(
        network.attach("a"), clock, GraphNeighbourhood(parse_topology("complete", 2), ["a", "b"], "a"),
        {"x": torch.zeros(512)}, timeout=1.0,
    )
    sender = network.attach("b")

    async def main():
        await sender.send("a", Message(MODEL, "b", 0, tensors, meta=meta, codec=codec))
        return await exchange.step(0, {"x": torch.ones(512)})

    result = run(main())
    assert exchange.transport.counters.rejected == 1
    assert result.heard == 0 and torch.equal(result.state["x"], torch.ones(512))


@pytest.mark.parametrize("spec, eta", [("none", None), ("choco", 0.0), ("econtrol:0.1", 0.1), ("econtrol:1", 1.0)])
def test_error_feedback_specs(spec, eta):
    assert parse_error_feedback(spec) == eta


@pytest.mark.parametrize("spec", ["", "ef21", "econtrol", "econtrol:0", "econtrol:1.5", "econtrol:nan", "choco:1"])
def test_bad_error_feedback_specs_name_the_valid_ones(spec):
    with pytest.raises(ValueError, match="valid: none, choco, or econtrol:ETA"):
        parse_error_feedback(spec)


def test_variance_correction_does_not_go_with_error_feedback():
    from gossip.variance import VarianceCorrected

    with pytest.raises(ValueError, match="--error-feedback none"):
        GossipSettings(codec="int8", error_feedback="choco", mixing=VarianceCorrected("self"))


def test_the_consensus_step_must_be_a_fraction():
    with pytest.raises(ValueError, match="consensus step"):
        ChocoExchange(
            SimNetwork().attach("a"), SimClock(), OverlayNeighbourhood("ring", "a", list),
            {"x": torch.zeros(2)}, timeout=1.0, codec=parse_codec("fp16"), consensus_step=1.5,
        )


@pytest.mark.parametrize(
    "codec, step", [("fp16", 1.0), ("int8", 1.0), ("topk:0.01", 0.04), ("topk:0.5", 1.0), ("randk:0.08+int8", 0.08)]
)
def test_default_consensus_steps_shrink_with_the_kept_fraction(codec, step):
    assert default_consensus_step(parse_codec(codec)) == pytest.approx(step)
