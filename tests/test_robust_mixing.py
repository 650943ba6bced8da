"""Robust mixing rules, the outlier guard, and what a hostile neighbour can do to a swarm."""

import asyncio
import math

import pytest
import torch

from gossip.mixing import WeightedAverage
from gossip.protocols import FedAvgClient, FedAvgServer, ProtocolContext
from gossip.robust import (
    CoordinateMedian,
    SelfCentredClipping,
    TrimmedMean,
    adaptive_radius,
    distance,
    mix_screened,
    outliers,
    screen,
)
from gossip.settings import GossipSettings
from peer.config import ConfigError, SimulationConfig, build_config, parse_mixing
from peer.sim import SimClock, SimNetwork
from tests.sim_swarm import build_gossip, run
from tests.vector_learner import VectorLearner
from topology import parse_topology

HUGE = 1e30


def vec(*values):
    return {"x": torch.tensor(values, dtype=torch.float64)}


# --- the rules, on small exact cases ---------------------------------------------------------


def test_clipping_shrinks_a_far_neighbour_to_the_radius_along_its_direction():
    mixed = SelfCentredClipping(1.0).mix(vec(0.0, 0.0), 1.0, [(1.0, vec(3.0, 4.0))])
    # ||(3, 4)|| = 5 is clipped to (0.6, 0.8), which counts with weight 1/2.
    assert torch.allclose(mixed["x"], torch.tensor([0.3, 0.4], dtype=torch.float64))


def test_clipping_is_the_weighted_average_when_every_neighbour_is_within_the_radius():
    g = torch.Generator().manual_seed(0)
    own = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    received = [(w, {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}) for w in (0.2, 0.3, 0.1)]
    clipped = SelfCentredClipping(100.0).mix(own, 0.4, received)
    plain = WeightedAverage().mix(own, 0.4, received)
    for name in own:
        assert torch.allclose(clipped[name], plain[name], atol=1e-6)


def test_the_adaptive_radius_clips_the_farther_half_of_the_neighbours():
    assert adaptive_radius([10.0, 1.0, 2.0]) == 2.0
    assert adaptive_radius([4.0, 3.0]) == 3.0  # with ours, 0 and 3 are a majority of three
    assert adaptive_radius([7.0]) == 7.0  # one neighbour: nothing to tell it from, nothing clipped
    own = vec(0.0)
    mixed = SelfCentredClipping().mix(own, 1.0, [(1.0, vec(1.0)), (1.0, vec(2.0)), (1.0, vec(-10.0))])
    # tau = 2: the neighbour at -10 counts as -2.
    assert mixed["x"].item() == pytest.approx((0 + 1 + 2 - 2) / 4)


@pytest.mark.parametrize("rule", [WeightedAverage(), SelfCentredClipping(), SelfCentredClipping(0.5)])
def test_weights_are_renormalised_over_the_models_that_arrived(rule):
    own, received = vec(0.0, 1.0), [vec(1.0, 3.0), vec(-2.0, 0.5)]
    missing_one = rule.mix(own, 0.25, [(0.25, state) for state in received])
    full = rule.mix(own, 1 / 3, [(1 / 3, state) for state in received])
    assert torch.allclose(missing_one["x"], full["x"])


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    own = vec(1.0, 50.0)
    received = [(1.0, vec(2.0, -50.0)), (1.0, vec(3.0, 2.0)), (1.0, vec(100.0, 4.0)), (1.0, vec(0.0, 3.0))]
    mixed = TrimmedMean(1).mix(own, 1.0, received)
    # First coordinate: 0 and 100 dropped, mean(1, 2, 3); second: -50 and 50 dropped, mean(2, 3, 4).
    assert mixed["x"].tolist() == [2.0, 3.0]


def test_trimmed_mean_falls_back_to_the_median_with_too_few_models():
    mixed = TrimmedMean(2).mix(vec(1.0), 1.0, [(1.0, vec(2.0)), (1.0, vec(30.0)), (1.0, vec(4.0))])
    assert mixed["x"].item() == 3.0  # four models cannot lose 2 from each end: median of 1, 2, 4, 30


def test_median_of_odd_and_even_counts():
    assert CoordinateMedian().mix(vec(1.0, 9.0), 1.0, [(1.0, vec(5.0, 8.0)), (1.0, vec(2.0, 7.0))])["x"].tolist() == [2.0, 8.0]
    even = CoordinateMedian().mix(vec(1.0), 1.0, [(1.0, vec(5.0)), (1.0, vec(2.0)), (1.0, vec(10.0))])
    assert even["x"].item() == 3.5


def test_a_model_without_weight_does_not_vote_in_a_coordinate_wise_rule():
    received = [(1.0, vec(1.0)), (1.0, vec(2.0)), (1.0, vec(3.0))]
    assert CoordinateMedian().mix(vec(100.0), 0.0, received)["x"].item() == 2.0
    assert TrimmedMean(1).mix(vec(100.0), 0.0, received)["x"].item() == 2.0


def test_robust_rules_keep_the_dtype_of_the_model():
    own = {"w": torch.tensor([1.0, 2.0], dtype=torch.float32)}
    received = [(1.0, {"w": torch.tensor([3.0, 4.0], dtype=torch.float32)})]
    for rule in (SelfCentredClipping(), TrimmedMean(1), CoordinateMedian()):
        assert rule.mix(own, 1.0, received)["w"].dtype == torch.float32


# --- the outlier guard -----------------------------------------------------------------------


def test_the_guard_catches_a_huge_model_even_from_our_only_neighbour():
    assert set(outliers({"mallory": HUGE}, scale=1.0)) == {"mallory"}
    # Two senders of the same absurd model do not vouch for each other: ours counts in the median.
    assert set(outliers({"m1": HUGE, "m2": HUGE}, scale=1.0)) == {"m1", "m2"}
    assert set(outliers({"a": 1.0, "b": 1.2, "c": 0.9, "mallory": HUGE}, scale=1.0)) == {"mallory"}


def test_the_guard_keeps_honest_models_that_are_legitimately_far():
    # Independently initialised models are about 1.4 norms apart.
    assert outliers({"a": 1.4, "b": 1.5}, scale=1.0) == {}
    # Far from the others but not absurd for a model of this size: two halves that drifted apart.
    assert outliers({"near": 0.01, "far": 5.0}, scale=1.0) == {}
    # Ours is the odd one out: the others agree with each other, however far they are from us.
    assert outliers({"a": 500.0, "b": 510.0, "c": 505.0}, scale=1.0) == {}


def test_screening_counts_and_leaves_out_the_outliers():
    network = SimNetwork()
    transport = network.attach("p0")
    own = vec(1.0, 1.0)
    received = {"a": (0.3, vec(1.0, 2.0)), "mallory": (0.3, vec(HUGE, HUGE)), "b": (0.3, vec(0.0, 1.0))}
    kept = screen(transport, own, received, step=0)
    assert list(kept) == ["a", "b"]
    assert transport.counters.rejections == {"outlier": 1}
    # A distance that overflows float32 is still measured.
    assert distance({"w": torch.zeros(2)}, {"w": torch.full((2,), 3e38)}) == pytest.approx(3e38 * math.sqrt(2), rel=1e-6)


def test_mixing_nothing_with_no_weight_of_our_own_keeps_our_model():
    transport = SimNetwork().attach("server")
    kept = mix_screened(WeightedAverage(), transport, vec(2.0), 0.0, {"mallory": (1.0, vec(HUGE))}, step=0)
    assert kept["x"].item() == 2.0


# --- hostile neighbours in a swarm -----------------------------------------------------------


class SendsHuge(VectorLearner):
    """An attacker: whatever it is sent, the model it shares is 1e30 in every weight."""

    def state(self):
        return {"x": torch.full_like(self.value, HUGE)}

    def load_state(self, state):
        pass


ALL_RULES = ["plain", "clipped", "clipped:0.5", "trimmed-mean:1", "median"]


@pytest.mark.parametrize("mixing", ALL_RULES)
@pytest.mark.parametrize("n", [2, 4])
def test_a_neighbour_sending_a_huge_model_does_not_move_dpsgd_peers(mixing, n):
    # Ring of 4: p0 and p2 each have p3, the attacker, as one of two neighbours; with 2 peers it is p0's only one.
    topology = parse_topology("ring", n)
    values = [torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]), torch.zeros(2)][:n]
    network, _, learners, protocols, _ = build_gossip(topology, values, settings=GossipSettings(mixing=parse_mixing(mixing)))
    attacker = SendsHuge(torch.zeros(2))
    protocols[-1].context.learner = learners[-1] = attacker
    rounds = 5

    async def main():
        await asyncio.gather(*(p.run(rounds) for p in protocols))

    run(main())
    for learner in learners[:-1]:
        # Finite, and still within the honest peers' initial range: nothing moved towards 1e30.
        assert bool(torch.isfinite(learner.value).all())
        assert 0.0 <= float(learner.value.min()) and float(learner.value.max()) <= 1.0
    assert network._endpoints["p0"].counters.rejections["outlier"] == rounds


def test_a_fedavg_client_sending_a_huge_model_is_left_out_of_the_global_model():
    network, clock = SimNetwork(), SimClock()

    async def noop(report):
        pass

    clients = {}
    for peer, learner in [("p0", VectorLearner(torch.zeros(1), drift=1.0)), ("p1", VectorLearner(torch.zeros(1), drift=1.0)),
                          ("mallory", SendsHuge(torch.zeros(1)))]:
        context = ProtocolContext(network.attach(peer), clock, learner, None, noop)
        clients[peer] = FedAvgClient(context, server="server", local_steps=1)
    server_learner = VectorLearner(torch.zeros(1))
    server = FedAvgServer(
        ProtocolContext(network.attach("server"), clock, server_learner, None, noop, GossipSettings(mixing=parse_mixing("median"))),
        clients=list(clients), sample_size=None, local_steps=1, round_timeout=30, seed=0,
    )

    async def main():
        await asyncio.gather(server.run(3), *(c.run(3) for c in clients.values()))

    run(main())
    assert server_learner.value.item() == pytest.approx(3.0)  # +1 a round from the two honest clients
    assert network._endpoints["server"].counters.rejections["outlier"] == 3


def test_a_modest_trainer_sending_a_huge_model_is_left_out_of_each_aggregate():
    from gossip.sampling import hash_order
    from tests.sim_swarm import ModestSwarm as Swarm

    rounds = 4
    swarm = Swarm(8, rounds=rounds, sample_size=8)
    aggregators = {hash_order(swarm.ids, r)[0] for r in range(rounds)}
    mallory = next(peer for peer in swarm.ids if peer not in aggregators)
    swarm.protocols[mallory].context.learner = SendsHuge(torch.zeros(1))
    run(swarm.run())
    honest = [peer for peer in swarm.ids if peer != mallory]
    # Every round all eight train (+1) and the seven honest models are averaged.
    expected = sum(float(int(peer[1:])) for peer in honest) / len(honest) + rounds
    for peer in honest:
        assert swarm.learners[peer].value.item() == pytest.approx(expected)
    assert sum(swarm.network._endpoints[peer].counters.rejections["outlier"] for peer in aggregators) == rounds


# --- the settings ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["clipped", "clipped:2.5", "trimmed-mean:1", "trimmed-mean:3", "median"])
def test_robust_specs_are_accepted(spec):
    config = build_config(SimulationConfig, {}, {"mixing": spec})
    assert config.gossip.mixing.spec == spec


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("clipped:-1", "radius TAU must be a positive number"),
        ("clipped:0", "radius TAU must be a positive number"),
        ("clipped:x", "radius TAU must be a positive number"),
        ("trimmed-mean:x", "whole number of at least 1"),
        ("trimmed-mean:-1", "whole number of at least 1"),
        ("trimmed-mean", "whole number of at least 1"),
        ("median:3", "median takes no argument"),
        ("geometric-median", "a robust rule: clipped[:TAU], trimmed-mean:B or median"),
    ],
)
def test_bad_mixing_specs_give_a_one_line_error(spec, reason):
    with pytest.raises(ConfigError) as error:
        build_config(SimulationConfig, {}, {"mixing": spec})
    message = str(error.value)
    assert message.startswith("--mixing: bad mixing") and reason in message and "\n" not in message


@pytest.mark.parametrize("spec", ["clipped", "trimmed-mean:1", "median"])
def test_robust_rules_are_refused_with_error_feedback(spec):
    with pytest.raises(ConfigError, match="works on whole models.*--error-feedback none"):
        build_config(SimulationConfig, {}, {"mixing": spec, "codec": "int8"})
