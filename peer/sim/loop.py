"""An asyncio event loop whose clock is virtual.

Everything in a simulation runs as ordinary asyncio code (sleeps, timeouts, futures); the
loop never blocks on I/O. When nothing is ready to run, instead of waiting for the next
timer it jumps its clock straight to it, so a 30-second timeout costs no wall time. The
order of events depends only on the order in which they were scheduled, so a run is
deterministic.
"""

from __future__ import annotations

import asyncio
import selectors


class SimulationDeadlock(RuntimeError):
    """Every task waits on something that no scheduled event will ever provide."""


class _TimeJumpSelector(selectors.BaseSelector):
    """A selector with no I/O: 'waiting' for ``timeout`` seconds advances the virtual clock."""

    def __init__(self, loop: VirtualTimeLoop):
        self._loop = loop
        self._keys: dict[int, selectors.SelectorKey] = {}

    def register(self, fileobj, events, data=None):
        key = selectors.SelectorKey(fileobj, self._fileno(fileobj), events, data)
        self._keys[key.fd] = key
        return key

    def unregister(self, fileobj):
        return self._keys.pop(self._fileno(fileobj))

    def select(self, timeout=None):
        if timeout is None:
            raise SimulationDeadlock(
                "the simulation cannot progress: every peer is waiting and no timer is scheduled"
            )
        self._loop.advance(timeout)
        return []

    def get_map(self):
        return self._keys

    @staticmethod
    def _fileno(fileobj) -> int:
        return fileobj if isinstance(fileobj, int) else fileobj.fileno()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._virtual_now = 0.0
        super().__init__(selector=_TimeJumpSelector(self))

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            self._virtual_now += seconds
