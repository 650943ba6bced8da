"""The wall clock: real time, and local work in a worker thread so the peer keeps serving."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from gossip.transport import Clock

T = TypeVar("T")


class WallClock(Clock):
    def __init__(self) -> None:
        self._start = asyncio.get_running_loop().time()
        self._work: asyncio.Future | None = None

    def now(self) -> float:
        return asyncio.get_running_loop().time() - self._start

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def compute(self, work: Callable[..., T], *args: Any, steps: int) -> T:
        # torch releases the GIL in its kernels, so neighbours' messages are served meanwhile.
        self._work = asyncio.ensure_future(asyncio.to_thread(work, *args))
        # A thread cannot be cancelled; shielding lets a cancelled peer wait for it in settle().
        return await asyncio.shield(self._work)

    async def settle(self) -> None:
        """Wait for local work that is still running, so that the model is in a consistent state."""
        if self._work is not None and not self._work.done():
            await asyncio.wait([self._work])
