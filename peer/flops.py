"""The arithmetic of one training step, and the rate of matrix products this machine reaches.

Both count only matrix products and convolutions (torch's FLOP counter), which is where the
arithmetic of these models is; their ratio says how close training comes to the machine's limit.
"""

from __future__ import annotations

import time

import torch

from peer.tasks import Task
from peer.trainer import label_losses

MATMUL_SIDE = 1024


def step_flops(task: Task, batch_size: int) -> int:
    """Floating-point operations of one forward and backward pass of the task's model on a batch."""
    from torch.utils.flop_counter import FlopCounterMode

    # Building the model draws from torch's RNG; fork it so counting does not shift the caller's seed.
    with torch.random.fork_rng(devices=[]):
        model = task.make_model()
    rows = torch.arange(batch_size) % len(task.train_x)
    with FlopCounterMode(display=False) as counter:
        label_losses(model(task.train_x[rows]), task.train_y[rows]).mean().backward()
    return int(counter.get_total_flops())


def matmul_flop_rate(device: torch.device, repeats: int = 5, products: int = 5) -> float:
    """FLOP/s of float32 square matrix products on ``device``, with torch's current threads: the best of
    ``repeats`` bursts, so that a moment of other work on the machine does not count."""
    a = torch.randn(MATMUL_SIDE, MATMUL_SIDE, device=device)
    b = torch.randn(MATMUL_SIDE, MATMUL_SIDE, device=device)
    for _ in range(3):  # warm the allocator and the kernels
        a @ b
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(products):
            a @ b
        _synchronize(device)
        best = min(best, (time.perf_counter() - started) / products)
    return 2 * MATMUL_SIDE**3 / best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
