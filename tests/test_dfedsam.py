"""DFedSAM and DFedSAM-MGS: the SAM step, Q gossip steps per round, and their cost in bytes."""

import asyncio

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gossip.protocols import DFedSAM
from gossip.settings import GossipSettings
from peer.config import SimulationConfig
from peer.sim import SimNetwork
from peer.simulate import simulate
from peer.trainer import Trainer, sam_perturbation
from tests.sim_swarm import build_gossip, run
from topology import parse_topology


def test_the_sam_perturbation_has_norm_rho_over_all_tensors():
    g = torch.Generator().manual_seed(0)
    gradients = [torch.randn(10, 3, generator=g), torch.randn(7, generator=g) * 100, torch.zeros(4)]
    deltas = sam_perturbation(gradients, 0.05)
    total = torch.linalg.vector_norm(torch.cat([d.flatten() for d in deltas]))
    assert float(total) == pytest.approx(0.05, rel=1e-6)
    for gradient, delta in zip(gradients, deltas):  # the direction of the gradient, scaled once for all
        torch.testing.assert_close(delta, gradient * (0.05 / float(torch.cat([x.flatten() for x in gradients]).norm())))


def test_a_sam_step_uses_the_gradient_at_the_perturbed_point():
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    model = torch.nn.Linear(5, 3)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(
        model, (x, y), (x, y), lr=0.1, momentum=0.0, weight_decay=0.0, batch_size=64, seed=0,
        device=torch.device("cpu"), sam_rho=0.5,
    )
    trainer.train(1)
    # By hand: the gradient at w, the point w + rho g/|g|, the gradient there, one SGD step from w.
    w = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    loss = F.cross_entropy(F.linear(x, w["weight"], w["bias"]), y)
    grads = torch.autograd.grad(loss, [w["weight"], w["bias"]])
    deltas = sam_perturbation(list(grads), 0.5)
    perturbed = [w["weight"] + deltas[0], w["bias"] + deltas[1]]
    sam_grads = torch.autograd.grad(F.cross_entropy(F.linear(x, *perturbed), y), [w["weight"], w["bias"]])
    expected = {"weight": start["weight"] - 0.1 * sam_grads[0], "bias": start["bias"] - 0.1 * sam_grads[1]}
    for name in expected:
        torch.testing.assert_close(model.state_dict()[name], expected[name])
    assert not torch.allclose(sam_grads[0], grads[0])  # the perturbation mattered


def build(spec, n, gossip_steps, timeout=5.0, network=None):
    topology = parse_topology(spec, n)
    x0 = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    network, _, learners, protocols, reports = build_gossip(
        topology, x0, settings=GossipSettings(timeout=timeout), network=network or SimNetwork(),
        protocol=DFedSAM, gossip_steps=gossip_steps,
    )
    return topology, x0, learners, protocols, reports, network


@pytest.mark.parametrize("spec", ["ring", "onepeer-exponential"])
def test_q_gossip_steps_apply_w_q_times_per_round(spec):
    n, rounds, q = 8, 3, 4
    topology, x0, learners, protocols, _, _ = build(spec, n, q)

    async def main():
        await asyncio.gather(*(p.run(rounds) for p in protocols))

    run(main())
    expected = x0.numpy()
    for step in range(rounds * q):
        expected = topology.mixing_matrix(step) @ expected
    np.testing.assert_allclose(np.stack([l.value.numpy() for l in learners]), expected, atol=1e-12)


def test_a_dead_neighbour_costs_a_round_one_timeout_not_q():
    network = SimNetwork()
    _, _, _, protocols, reports, network = build("ring", 4, gossip_steps=4, timeout=2.0, network=network)
    network.crash("p0")

    async def main():
        await asyncio.gather(*(p.run(3) for p in protocols[1:]))
        return asyncio.get_running_loop().time()

    finished_at = run(main())
    assert all(len(reports[p]) == 3 for p in ["p1", "p2", "p3"])
    # Three rounds: at most one 2-second wait each (plus latency), where Q separate timeouts would take 24 s.
    assert finished_at < 3 * 2.0 + 1.0
    assert reports["p1"][0].neighbours_expected == 8 and reports["p1"][0].neighbours_heard == 4


def test_dfedsam_with_q_gossip_steps_sends_q_times_the_bytes():
    base = dict(peers=4, rounds=2, local_steps=2, partition="iid", eval_every=2)
    dpsgd = simulate(SimulationConfig(**base)).summary
    mgs = simulate(SimulationConfig(**base, algorithm="dfedsam", gossip_steps=3, sam_rho=0.05)).summary
    assert mgs["bytes_sent_total"] == pytest.approx(3 * dpsgd["bytes_sent_total"], rel=0.01)
    assert mgs["label"].startswith("DFedSAM") and mgs["gossip_steps"] == 3 and mgs["sam_rho"] == 0.05
