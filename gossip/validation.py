"""Checks that a received state may touch our model: same names, shapes and dtypes, all finite."""

from __future__ import annotations

import torch

from gossip.learner import State


class InvalidState(ValueError):
    """A received state that must not be mixed; the message says why."""


def check_state(received: dict[str, torch.Tensor], reference: State) -> None:
    if received.keys() != reference.keys():
        missing = sorted(reference.keys() - received.keys())
        extra = sorted(received.keys() - reference.keys())
        raise InvalidState(f"tensor names differ (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, tensor in received.items():
        ref = reference[name]
        if tensor.shape != ref.shape:
            raise InvalidState(f"{name}: shape {tuple(tensor.shape)} != expected {tuple(ref.shape)}")
        if tensor.dtype != ref.dtype:
            raise InvalidState(f"{name}: dtype {tensor.dtype} != expected {ref.dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidState(f"{name}: contains NaN or infinity")
