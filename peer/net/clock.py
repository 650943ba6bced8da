"""The wall clock: real time, and local work in a worker thread so the peer keeps serving."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from gossip.transport import Clock

T = TypeVar("T")


class WallClock(Clock):
    def __init__(self, slowdown: float = 1.0) -> None:
        if not slowdown >= 1:
            raise ValueError(f"a slowdown is a factor >= 1, got {slowdown}")
        self._start = asyncio.get_running_loop().time()
        self._work: asyncio.Future | None = None
        # Plays slower hardware: after local work, sleep (slowdown - 1) times as long as it took.
        self.slowdown = slowdown

    def now(self) -> float:
        return asyncio.get_running_loop().time() - self._start

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def compute(self, work: Callable[..., T], *args: Any, steps: int) -> T:
        # torch releases the GIL in its kernels, so neighbours' messages are served meanwhile.
        started = self.now()
        self._work = asyncio.ensure_future(asyncio.to_thread(work, *args))
        # A thread cannot be cancelled; shielding lets a cancelled peer wait for it in settle().
        result = await asyncio.shield(self._work)
        if self.slowdown > 1:
            await asyncio.sleep((self.slowdown - 1) * (self.now() - started))
        return result

    async def settle(self) -> None:
        """Wait for local work that is still running, so that the model is in a consistent state."""
        if self._work is not None and not self._work.done():
            await asyncio.wait([self._work])
