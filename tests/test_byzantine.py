"""Attackers in the simulator: the attacks' arithmetic, the spec, who attacks, and honest-only reports."""

import asyncio
import json

import pytest
import torch

from gossip.neighbourhood import GraphNeighbourhood
from gossip.protocols import DPSGD, ProtocolContext
from gossip.settings import GossipSettings
from peer.cli import main
from peer.config import SimulationConfig
from peer.sim import LinkModel, SimClock, SimNetwork
from peer.sim.byzantine import (
    HUGE,
    Adversary,
    Attacker,
    ByzantineError,
    ByzantineSpec,
    HonestModels,
    TargetView,
    a_little_is_enough,
    choose_attackers,
    craft,
    dissensus,
    gaussian_noise,
    huge,
    inner_product_manipulation,
    parse_byzantine,
    sign_flip,
)
from peer.simulate import peer_ids, simulate
from tests.sim_swarm import run
from tests.vector_learner import VectorLearner
from topology import parse_topology

# The target's model first, then its one honest neighbour's: mean [2, 4], population std [1, 2].
HONEST = torch.tensor([[1.0, 2.0], [3.0, 6.0]])


def test_sign_flip_alie_and_ipm_work_on_the_honest_mean_and_std():
    assert torch.equal(sign_flip(HONEST), torch.tensor([-2.0, -4.0]))
    assert torch.equal(a_little_is_enough(HONEST, 1.0), torch.tensor([1.0, 2.0]))
    assert torch.equal(a_little_is_enough(HONEST, 2.0), torch.tensor([0.0, 0.0]))
    assert torch.allclose(inner_product_manipulation(HONEST, 0.1), torch.tensor([-0.2, -0.4]))
    # One honest model: no spread, so ALIE sends it as it is.
    assert torch.equal(a_little_is_enough(HONEST[:1], 5.0), HONEST[0])


def test_dissensus_undoes_the_honest_pull_times_eps():
    target = torch.tensor([1.0, 2.0])
    neighbours = torch.tensor([[3.0, 6.0], [5.0, 2.0]])
    weights = torch.tensor([0.25, 0.25])
    crafted = dissensus(target, neighbours, weights, 0.5, 1.5)
    # pull = 0.25 * [2, 4] + 0.25 * [4, 0] = [1.5, 1]; x_i - 1.5 * pull / 0.5
    assert torch.equal(crafted, torch.tensor([-3.5, -1.0]))
    # Mixed with the attackers' weight, the target moves by (1 - eps) times the pull: away from its neighbours.
    mixed = 0.25 * neighbours[0] + 0.25 * neighbours[1] + 0.5 * crafted
    assert torch.allclose(mixed, target - 0.5 * torch.tensor([1.5, 1.0]))
    assert torch.equal(dissensus(target, target.new_empty((0, 2)), target.new_empty(0), 0.5, 1.5), target)


def test_noise_is_the_honest_mean_plus_seeded_gaussian_noise():
    crafted = gaussian_noise(HONEST, 0.5, torch.Generator().manual_seed(7))
    expected = torch.tensor([2.0, 4.0]) + 0.5 * torch.randn(2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(crafted, expected)
    assert not torch.equal(crafted, gaussian_noise(HONEST, 0.5, torch.Generator().manual_seed(8)))


def test_huge_fills_the_model_with_1e30():
    assert torch.equal(huge(torch.zeros(3)), torch.full((3,), 1e30))
    assert HUGE == 1e30


@pytest.mark.parametrize(
    ("attack", "parameter", "expected"),
    [
        ("signflip", None, [-2.0, -4.0]),
        ("alie", 1.0, [1.0, 2.0]),
        ("ipm", 0.5, [-1.0, -2.0]),
        ("dissensus", 1.0, [1.0 - 0.5 * 2.0 / 0.5, 2.0 - 0.5 * 4.0 / 0.5]),
        ("huge", None, [1e30, 1e30]),
    ],
)
def test_craft_applies_the_attack_the_spec_names(attack, parameter, expected):
    view = TargetView(HONEST[0], HONEST[1:], torch.tensor([0.5]), attacker_weight=0.5)
    crafted = craft(ByzantineSpec(0.2, attack, parameter), view, torch.Generator().manual_seed(0))
    assert torch.allclose(crafted, torch.tensor(expected))


def test_good_specs_parse():
    assert parse_byzantine("none") is None
    assert parse_byzantine("0.2:signflip") == ByzantineSpec(0.2, "signflip")
    assert parse_byzantine("0.25:alie:1") == ByzantineSpec(0.25, "alie", 1.0)
    assert parse_byzantine("0.1:dissensus:1.5") == ByzantineSpec(0.1, "dissensus", 1.5)
    assert parse_byzantine("0.2:noise:1e-2") == ByzantineSpec(0.2, "noise", 0.01)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("signflip:3", "fraction F must be a number in (0, 1)"),
        ("alie", "fraction F"),
        ("1:huge", "fraction F"),
        ("0:huge", "fraction F"),
        ("nan:huge", "fraction F"),
        ("0.2:signflip:3", "signflip takes no parameter"),
        ("0.2:alie", "alie takes a positive number"),
        ("0.2:alie:x", "alie takes a positive number"),
        ("0.2:ipm:inf", "ipm takes a positive number"),
        ("0.2:noise:-1", "noise takes a positive number"),
        ("0.5:foo", "unknown attack 'foo'"),
    ],
)
def test_a_bad_spec_says_what_is_wrong(spec, reason):
    with pytest.raises(ByzantineError) as error:
        parse_byzantine(spec)
    assert reason in str(error.value) and "F:ATTACK" in str(error.value)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--byzantine", "0.2:alie:x"], "--byzantine: bad attack spec"),
        (["--byzantine", "0.5:foo"], "--byzantine: bad attack spec"),
        (["--byzantine", "0.01:huge"], "makes 0 attackers"),
        (["--byzantine", "0.9:huge", "--peers", "4"], "makes 4 attackers"),
        (["--byzantine", "0.2:huge", "--algorithm", "modest"], "not modest"),
        (["--byzantine", "0.2:huge", "--algorithm", "fedavg"], "not fedavg"),
        (["--byzantine", "0.2:huge", "--codec", "int8"], "--error-feedback none"),
    ],
)
def test_bad_attackers_are_one_line_errors_naming_the_flag(capsys, args, reason):
    assert main(["simulate", "--rounds", "1", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert reason in err and "--byzantine" in err


def test_attackers_are_drawn_from_the_seed():
    peers = peer_ids(16)
    spec = ByzantineSpec(0.2, "huge")
    chosen = choose_attackers(spec, peers, seed=0)
    assert len(chosen) == 3  # round(0.2 * 16)
    assert chosen == choose_attackers(spec, list(reversed(peers)), seed=0) <= set(peers)
    assert len({choose_attackers(spec, peers, seed) for seed in range(5)}) > 1


def attacked_ring(spec: ByzantineSpec, values: list[torch.Tensor]):
    """Peer p0 attacks; the others run D-PSGD on a ring, their transports tapped."""
    topology = parse_topology("ring", len(values))
    ids = [f"p{i}" for i in range(len(values))]
    network, clock, settings = SimNetwork(LinkModel(latency=0.01)), SimClock(), GossipSettings()
    learners = [VectorLearner(value) for value in values]
    adversary = Adversary(
        spec, frozenset({"p0"}), topology, ids, HonestModels(learners[0].state()), live=lambda peer: True, seed=0
    )

    async def finished(report):
        pass

    protocols = []
    for peer, learner in zip(ids, learners):
        transport = network.attach(peer)
        neighbourhood = GraphNeighbourhood(topology, ids, peer)
        if peer == "p0":
            context = ProtocolContext(transport, clock, learner, neighbourhood, finished, settings)
            protocols.append(Attacker(context, adversary, gossip_steps=1))
        else:
            context = ProtocolContext(adversary.tap(transport), clock, learner, neighbourhood, finished, settings)
            protocols.append(DPSGD(context, local_steps=1))
    return learners, protocols


@pytest.mark.parametrize("spec", [ByzantineSpec(0.25, "ipm", 0.5), ByzantineSpec(0.25, "dissensus", 1.5)])
def test_an_attacker_gossips_its_crafted_model_as_an_ordinary_model_message(spec):
    values = [torch.tensor([v], dtype=torch.float64) for v in (0.0, 1.0, 4.0, 10.0)]
    learners, protocols = attacked_ring(spec, values)

    async def one_round():
        await asyncio.gather(*(protocol.run(1) for protocol in protocols))

    run(one_round())
    x1, x2, x3 = (value.item() for value in values[1:])
    # Metropolis weights on a ring: a third each. p1 and p3 are p0's targets; p2 hears honest peers only.
    if spec.attack == "ipm":
        expected_p1 = (x1 + x2 - 0.5 * (x1 + x2) / 2) / 3
        expected_p3 = (x3 + x2 - 0.5 * (x3 + x2) / 2) / 3
    else:
        expected_p1 = x1 + (1 - 1.5) * (x2 - x1) / 3
        expected_p3 = x3 + (1 - 1.5) * (x2 - x3) / 3
    assert learners[1].value.item() == pytest.approx(expected_p1, abs=1e-12)
    assert learners[3].value.item() == pytest.approx(expected_p3, abs=1e-12)
    assert learners[2].value.item() == pytest.approx((x1 + x2 + x3) / 3, abs=1e-12)


def test_a_run_with_attackers_reports_the_honest_peers_only(tmp_path):
    config = SimulationConfig(
        peers=8, topology="ring", task="mnist1d", partition="iid", rounds=3, local_steps=2, seed=0,
        mixing="plain", byzantine="0.25:huge", out=tmp_path,
    )
    result = simulate(config)
    summary = json.loads((tmp_path / "summary.json").read_text())
    attackers = set(summary["attackers"])
    honest = set(peer_ids(8)) - attackers
    assert summary["byzantine"] == "0.25:huge" and len(attackers) == 2
    assert attackers == choose_attackers(parse_byzantine("0.25:huge"), peer_ids(8), seed=0)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {(line["peer"], line["round"]) for line in lines} == {(peer, r) for peer in honest for r in range(3)}
    assert {record.peer for record in result.final} == honest
    accuracies = [record.accuracy for record in result.final]
    assert summary["mean_accuracy"] == pytest.approx(sum(accuracies) / len(accuracies))
    assert summary["min_accuracy"] == min(accuracies) and summary["max_accuracy"] == max(accuracies)
    assert summary["peers_up_at_end"] == 6
    # The attackers' models reached their targets in time, and were caught there (as outliers,
    # or once the models they wrecked were no longer finite).
    assert all(line["neighbours_heard"] == line["neighbours_expected"] == 2 for line in lines if line["round"] == 0)
    assert summary["rejected_total"] > 0
