"""Local work in proportion to speed (asynchronous Local-SGD's dynamic local updates,
docs/algorithms.md#asynchronous-gossip): a peer takes H * v / v_max local steps per iteration, rounded and at least one, where
v is its own measured speed and v_max the fastest the swarm knows of, so that slow and fast peers
finish their iterations at about the same pace and slow peers' models are not stale.

No peer knows every speed: each reports, with its models, the fastest speed it knows of (its
own, or what its neighbours reported, faded by ``FADE`` per report), so the maximum spreads over
the graph in as many iterations as the graph is wide, and the speed of a fast peer that has
left fades away instead of circling the graph for ever. A neighbour that lies about speed can
make us take one step per iteration, no fewer.
"""

from __future__ import annotations

import math

FADE = 0.99  # what a report heard from a neighbour still counts, per iteration it is passed on
SMOOTHING = 0.3  # weight of the newest measurement in the running speed (durations vary from one iteration to the next)


class AdaptiveSteps:
    def __init__(self, most: int):
        if most < 1:
            raise ValueError(f"the fastest peer's local steps must be at least 1, got {most}")
        self.most = most
        self.own: float | None = None  # local steps per second, smoothed
        self._heard: float | None = None  # the fastest the neighbours reported, faded once

    def measured(self, steps: int, seconds: float) -> None:
        """``steps`` local steps took ``seconds`` (clock seconds; no measurement when they took no time)."""
        if steps <= 0 or not (math.isfinite(seconds) and seconds > 0):
            return
        speed = steps / seconds
        self.own = speed if self.own is None else (1 - SMOOTHING) * self.own + SMOOTHING * speed

    def heard(self, fastest: float | None) -> None:
        """The fastest speed this peer's in-neighbours reported at the last mix (None: none did)."""
        self._heard = None if fastest is None else FADE * fastest

    def fastest(self) -> float | None:
        """The fastest speed this peer knows of, as it reports it to its neighbours."""
        known = [speed for speed in (self.own, self._heard) if speed is not None]
        return max(known, default=None)

    def steps(self) -> int:
        """Local steps for the next iteration: the most until this peer has measured itself."""
        fastest = self.fastest()
        if self.own is None or fastest is None:
            return self.most
        return max(1, min(self.most, round(self.most * self.own / fastest)))
