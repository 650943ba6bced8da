"""Random changes to training batches, drawn per sample from a peer's own generator.

An augmentation is two steps so that many peers' batches can be changed at once: ``draw`` takes
the random numbers for some samples from a peer's generator (on the CPU, so a run is the same
on any device), and ``apply`` changes a whole batch by them on the batch's own device.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Augmentation(Protocol):
    def draw(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """The random numbers for ``count`` samples, one row each."""

    def apply(self, batch: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
        """``batch`` (samples first) changed by the rows of ``drawn``, one per sample."""


class CropAndFlip:
    """Random crop of an image padded by ``padding`` zero pixels on each side, and a horizontal flip
    with probability 1/2: the usual augmentation for small natural images (N, C, H, W)."""

    def __init__(self, padding: int = 4):
        self.padding = padding

    def draw(self, count: int, generator: torch.Generator) -> torch.Tensor:
        shifts = torch.randint(0, 2 * self.padding + 1, (count, 2), generator=generator)
        flips = torch.randint(0, 2, (count, 1), generator=generator)
        return torch.cat([shifts, flips], dim=1)

    def apply(self, batch: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
        drawn = drawn.to(batch.device)
        count, _, height, width = batch.shape
        padded = torch.nn.functional.pad(batch, (self.padding,) * 4)
        rows = drawn[:, 0, None] + torch.arange(height, device=batch.device)  # (N, H)
        across = torch.arange(width, device=batch.device)
        # A flipped sample reads its columns right to left.
        columns = drawn[:, 1, None] + torch.where(drawn[:, 2, None].bool(), width - 1 - across, across)  # (N, W)
        samples = torch.arange(count, device=batch.device)[:, None, None, None]
        channels = torch.arange(batch.shape[1], device=batch.device)[None, :, None, None]
        return padded[samples, channels, rows[:, None, :, None], columns[:, None, None, :]]
