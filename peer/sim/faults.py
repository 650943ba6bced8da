"""Faults to replay in a simulation: peers that crash, leave or join, and partitions of the network.

A spec is a comma-separated list of events, each KIND:AMOUNT@ROUND, or KIND:AMOUNT@START-END
for a partition:

    crash:0.8@30           a random 80% of the peers up at round 30 stop answering, without a word
    leave:0.2@20           a random 20% say goodbye through their protocol, then stop
    join:16@40             16 new peers start at round 40 and join through their protocol
    partition:0.5@20-50    a random half of the peers up at round 20 is cut from the rest until
                           round 50: messages between the two sides are lost, within a side they flow
    crash-holder:60@1000   (a token walk) the peer that holds a token as it makes hop 1000 crashes,
                           and starts again 60 simulated seconds later, its memory of the walk gone

Which peers crash, leave or are cut off is drawn from the run's seed, so a run replays exactly.
Partitions may follow one another but not overlap: there is one cut at a time.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

FAULT_KINDS = ("crash", "leave", "join", "partition", "crash-holder")
_EVENT = re.compile(r"^(crash-holder|crash|leave|join|partition):([0-9.]+)@([0-9]+)(?:-([0-9]+))?$")


class FaultError(ValueError):
    """A fault spec that does not parse or does not fit the run."""


@dataclass(frozen=True)
class Fault:
    # heal: the end of a partition, which the partition's spec gives (it is not written on its own)
    kind: Literal["crash", "leave", "join", "partition", "heal", "crash-holder"]
    # crash, leave, partition: a fraction of the peers up; join: a number of peers; crash-holder:
    # the seconds until the peer starts again
    amount: float
    round: int

    def victims(self, up: list[str], seed: int, index: int) -> list[str]:
        """The peers (of ``up``) that this crash or leave takes, or this partition cuts off; the same for a seed."""
        count = min(len(up), round(self.amount * len(up)))
        return sorted(random.Random(f"{seed}:fault:{index}").sample(sorted(up), count))


def parse_faults(
    spec: str, *, rounds: int, has_holders: bool = False, holders: list[str] = ()
) -> tuple[Fault, ...]:
    """The events of a spec in round order (a partition is two: its cut and its heal);
    FaultError naming the bad event and the valid forms. ``has_holders``: the run's rounds have
    holders that ``crash-holder`` takes; ``holders``: the protocols whose rounds do."""
    if spec.strip() in ("", "none"):
        return ()
    faults = []
    cuts: list[tuple[int, int, str]] = []
    for item in (item.strip() for item in spec.split(",")):
        match = _EVENT.match(item)
        if match is None:
            raise FaultError(
                f"fault {item[:60]!r} does not parse; write KIND:AMOUNT@ROUND with KIND one of "
                f"crash, leave or join, partition:FRACTION@START-END, or crash-holder:SECONDS@ROUND, "
                "e.g. crash:0.8@30,join:16@40"
            )
        kind, amount_text, round_text, end_text = match.groups()
        round_ = int(round_text)
        if round_ >= rounds:
            raise FaultError(f"fault {item!r} is at round {round_}, past the last round {rounds - 1}")
        if (kind == "partition") != (end_text is not None):
            raise FaultError(
                f"fault {item!r}: a partition takes rounds START-END (e.g. partition:0.5@20-50), other faults one round"
            )
        try:
            amount = float(amount_text)
        except ValueError:
            raise FaultError(f"fault {item!r}: {amount_text!r} is not a number") from None
        if kind == "join":
            if amount != int(amount) or amount < 1:
                raise FaultError(f"fault {item!r}: join takes a whole number of peers, at least 1")
        elif kind == "partition":
            if not 0 < amount < 1:
                raise FaultError(f"fault {item!r}: partition takes a fraction of the peers in (0, 1) to cut off")
            end = int(end_text)
            if end <= round_:
                raise FaultError(f"fault {item!r}: the partition must end after it starts (END > START)")
            if end >= rounds:
                raise FaultError(f"fault {item!r} ends at round {end}, past the last round {rounds - 1}")
            for start, other_end, other in cuts:
                if round_ < other_end and start < end:
                    raise FaultError(f"faults {other!r} and {item!r} overlap; there is one partition at a time")
            cuts.append((round_, end, item))
            faults.append(Fault("heal", amount, end))
        elif kind == "crash-holder":
            if not has_holders:
                raise FaultError(
                    f"fault {item!r}: only a round held by one peer (--algorithm {' or '.join(holders)}) has a holder "
                    "to crash; use crash:F@R"
                )
            if round_ < 1 or not amount > 0:
                raise FaultError(f"fault {item!r}: crash-holder takes seconds > 0 and a round >= 1, e.g. crash-holder:60@1000")
        elif not 0 < amount <= 1:
            raise FaultError(f"fault {item!r}: {kind} takes a fraction of the peers in (0, 1]")
        faults.append(Fault(kind, amount, round_))  # type: ignore[arg-type]
    # A partition that ends where the next one starts heals first.
    return tuple(sorted(faults, key=lambda fault: (fault.round, fault.kind != "heal")))
