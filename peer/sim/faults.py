"""Faults to replay in a simulation: peers that crash, leave or join at a given round.

A spec is a comma-separated list of events, each KIND:AMOUNT@ROUND:

    crash:0.8@30   a random 80% of the peers up at round 30 stop answering, without a word
    leave:0.2@20   a random 20% say goodbye through their protocol, then stop
    join:16@40     16 new peers start at round 40 and join through their protocol

Which peers crash or leave is drawn from the run's seed, so a run replays exactly.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

FAULT_KINDS = ("crash", "leave", "join")
_EVENT = re.compile(r"^(crash|leave|join):([0-9.]+)@([0-9]+)$")


class FaultError(ValueError):
    """A fault spec that does not parse or does not fit the run."""


@dataclass(frozen=True)
class Fault:
    kind: Literal["crash", "leave", "join"]
    amount: float  # crash, leave: a fraction of the peers up; join: a number of peers
    round: int

    def victims(self, up: list[str], seed: int, index: int) -> list[str]:
        """The peers (of ``up``) that this crash or leave takes; the same for a seed."""
        count = min(len(up), round(self.amount * len(up)))
        return sorted(random.Random(f"{seed}:fault:{index}").sample(sorted(up), count))


def parse_faults(spec: str, *, rounds: int) -> tuple[Fault, ...]:
    """The events of a spec in round order; FaultError naming the bad event and the valid forms."""
    if spec.strip() in ("", "none"):
        return ()
    faults = []
    for item in spec.split(","):
        match = _EVENT.match(item.strip())
        if match is None:
            raise FaultError(
                f"fault {item.strip()[:60]!r} does not parse; write KIND:AMOUNT@ROUND with KIND one of "
                f"{', '.join(FAULT_KINDS)}, e.g. crash:0.8@30,join:16@40"
            )
        kind, amount_text, round_text = match.groups()
        round_ = int(round_text)
        if round_ >= rounds:
            raise FaultError(f"fault {item.strip()!r} is at round {round_}, past the last round {rounds - 1}")
        try:
            amount = float(amount_text)
        except ValueError:
            raise FaultError(f"fault {item.strip()!r}: {amount_text!r} is not a number") from None
        if kind == "join":
            if amount != int(amount) or amount < 1:
                raise FaultError(f"fault {item.strip()!r}: join takes a whole number of peers, at least 1")
        elif not 0 < amount <= 1:
            raise FaultError(f"fault {item.strip()!r}: {kind} takes a fraction of the peers in (0, 1]")
        faults.append(Fault(kind, amount, round_))  # type: ignore[arg-type]
    return tuple(sorted(faults, key=lambda fault: fault.round))
