"""Variance-corrected mixing: the corrected average has the target variance per tensor."""

import pytest
import torch

from gossip.mixing import WeightedAverage
from gossip.variance import VarianceCorrected, parse_target


def models(k, std=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "conv.weight": torch.randn(64, 32, generator=g) * std * (1 + i / k),
            "conv.bias": torch.randn(64, generator=g) * std + 3.0,
            "bn.running_var": torch.rand(64, generator=g) + 0.5,
            "scale": torch.randn(1, generator=g),
        }
        for i in range(k)
    ]


def variance(t):
    return float(t.var(correction=0))


def mix(rule, states):
    own, *others = states
    return rule.mix(own, 1.0, [(1.0, s) for s in others])


def test_plain_averaging_shrinks_the_variance_of_independent_models():
    states = models(8)
    mixed = mix(WeightedAverage(), states)
    mean_variance = sum(variance(s["conv.weight"]) for s in states) / 8
    assert variance(mixed["conv.weight"]) < 0.25 * mean_variance


@pytest.mark.parametrize("target", ["others", "self", "conservative:0.3"])
def test_the_corrected_average_has_the_target_variance(target):
    states = models(8)
    mixed = mix(VarianceCorrected(target), states)
    plain = mix(WeightedAverage(), states)
    for name in ("conv.weight", "conv.bias"):
        own = variance(states[0][name])
        others = sum(variance(s[name]) for s in states[1:]) / 7
        expected = {
            "others": sum(variance(s[name]) for s in states) / 8,
            "self": own,
            "conservative:0.3": 0.3 * own + 0.7 * others,
        }[target]
        # Exact but for eps = 1e-4 in the ratio.
        assert variance(mixed[name]) == pytest.approx(expected, rel=5e-3)
        # Rescaled around the mean, which is kept.
        assert float(mixed[name].mean()) == pytest.approx(float(plain[name].mean()), abs=1e-5)
        assert torch.corrcoef(torch.stack([mixed[name].flatten(), plain[name].flatten()]))[0, 1] > 0.9999


def test_batchnorm_statistics_and_scalars_are_only_averaged():
    states = models(4)
    mixed = mix(VarianceCorrected(), states)
    plain = mix(WeightedAverage(), states)
    for name in ("bn.running_var", "scale"):
        assert torch.equal(mixed[name], plain[name])


def test_alone_a_peer_keeps_its_model():
    (own,) = models(1)
    mixed = VarianceCorrected().mix(own, 1.0, [])
    for name in own:
        assert torch.equal(mixed[name], own[name])


@pytest.mark.parametrize("spec", ["", "mean", "conservative", "conservative:1.5", "conservative:x", "self:1"])
def test_bad_targets_name_the_valid_ones(spec):
    with pytest.raises(ValueError, match="valid: others, self, or conservative:C"):
        parse_target(spec)
