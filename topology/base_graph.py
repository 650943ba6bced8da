"""Base-(k+1) graphs: a short sequence of graphs, each peer with at most k neighbours per
round, whose mixing matrices multiply to exactly the average 11^T/n, for any number of peers n
(Takezawa et al., NeurIPS 2023). After one period every peer holds the exact mean.

The rules, with b = k + 1:

1. **Hyper-hypercube.** When every prime factor of m is at most b, write m = f_1 f_2 ... f_L
   with each f_l in 2..b (largest factors first, so L is small). Peer p has the mixed-radix
   digits of its place; in round l it averages uniformly with the f_l - 1 peers whose digits
   differ from its own in digit l only. After L rounds all m hold the mean.
2. **Simple Base-(k+1)**, any m. Write m in base b: m = sum_l a_l b^(p_l) with p_0 > p_1 > ...
   and digits a_l in 1..k. Group V_l holds n_l = a_l b^(p_l) consecutive peers, cut into a_l
   subgroups of b^(p_l). Then:
   - every group reaches its own mean by rule 1 (n_l has no prime factor above b);
   - merge step s = 0, 1, ..., L-2: each peer i of the later groups V_(>s) meets one unused peer
     j of each subgroup of V_s, with weight w = b^(p_s) / S_s on the link, S_s = sum_(l>=s) n_l
     (i keeps 1 - a_s w, j keeps 1 - w). A subgroup has b^(p_s) > S_(s+1) peers, enough for
     all of them. Afterwards the later groups hold the mean of V_s and of themselves weighted
     by size, and each subgroup of V_s holds the mean of all m in its own average;
   - so right after its merge step, each subgroup of V_s averages within itself by rule 1, while
     the later merge steps go on. The last group holds the mean after the last merge step.
3. **Base-(k+1).** Split m = m_small * m_rest, m_small the largest divisor of m with no prime
   factor above b. When m_rest > 1, the m_small blocks of m_rest consecutive peers may run rule 2
   side by side, then the peers at the same place of each block average by rule 1; the shorter
   of this and rule 2 on the whole is used.

A round is a list of meetings; a peer in none keeps its own model.
"""

from __future__ import annotations

from dataclasses import dataclass

from topology.drawn import Rows


@dataclass(frozen=True)
class Clique:
    """Its members average uniformly."""

    members: tuple[int, ...]


@dataclass(frozen=True)
class Star:
    """The centre takes ``weight`` of each leaf; each leaf takes ``weight`` of the centre."""

    centre: int
    leaves: tuple[int, ...]
    weight: float


Meeting = Clique | Star
Schedule = list[list[Meeting]]


def base_graph_rounds(n: int, max_degree: int) -> Schedule:
    """The rounds of the Base-(max_degree + 1) graph on peers 0..n-1."""
    b = max_degree + 1
    small = smooth_part(n, b)
    whole = simple_base(list(range(n)), b)
    if small in (1, n):
        return whole
    rest = n // small
    blocks = [list(range(q * rest, (q + 1) * rest)) for q in range(small)]
    columns = [[block[c] for block in blocks] for c in range(rest)]
    split = _side_by_side([simple_base(block, b) for block in blocks])
    split += _side_by_side([hyper_hypercube(column, b) for column in columns])
    return split if len(split) < len(whole) else whole


def rows_of(n: int, meetings: list[Meeting]) -> Rows:
    """One round's mixing rows (row i: {j: W[i, j]}, i included)."""
    rows: Rows = [{i: 1.0} for i in range(n)]
    for meeting in meetings:
        if isinstance(meeting, Clique):
            share = 1.0 / len(meeting.members)
            for i in meeting.members:
                rows[i] = dict.fromkeys(meeting.members, share)
        else:
            w = meeting.weight
            rows[meeting.centre] = {meeting.centre: 1.0 - w * len(meeting.leaves)} | dict.fromkeys(meeting.leaves, w)
            for leaf in meeting.leaves:
                rows[leaf] = {leaf: 1.0 - w, meeting.centre: w}
    return rows


def smooth_part(m: int, b: int) -> int:
    """The largest divisor of m with no prime factor above b."""
    part, rest = 1, m
    for p in range(2, b + 1):
        while rest % p == 0:
            part, rest = part * p, rest // p
    return part


def factors(m: int, b: int) -> list[int] | None:
    """m as a product of factors in 2..b, largest first; None when a prime factor exceeds b."""
    found, rest = [], m
    for f in range(b, 1, -1):
        while rest % f == 0:
            found.append(f)
            rest //= f
    return found if rest == 1 else None


def hyper_hypercube(peers: list[int], b: int) -> Schedule:
    """Rule 1 on ``peers`` (their number has no prime factor above b)."""
    digits = factors(len(peers), b)
    if digits is None:
        raise ValueError(f"{len(peers)} peers have a prime factor above {b}")
    rounds: Schedule = []
    stride = 1
    for f in digits:
        cliques = [
            Clique(tuple(peers[place + d * stride] for d in range(f)))
            for place in range(len(peers))
            if (place // stride) % f == 0
        ]
        rounds.append(cliques)
        stride *= f
    return rounds


def simple_base(peers: list[int], b: int) -> Schedule:
    """Rule 2 on ``peers``."""
    if factors(len(peers), b) is not None:
        return hyper_hypercube(peers, b)
    groups = _base_b_groups(peers, b)
    rounds = _side_by_side([hyper_hypercube(group, b) for group, _, _ in groups])
    start = len(rounds)
    for step, (group, digit, power) in enumerate(groups[:-1]):
        later = [peer for other, _, _ in groups[step + 1:] for peer in other]
        size = b**power
        subgroups = [group[a * size:(a + 1) * size] for a in range(digit)]
        weight = size / (len(group) + len(later))
        merge = [Star(peer, tuple(sub[used] for sub in subgroups), weight) for used, peer in enumerate(later)]
        _add(rounds, start + step, [merge])
        _add(rounds, start + step + 1, _side_by_side([hyper_hypercube(sub, b) for sub in subgroups]))
    return rounds


def _base_b_groups(peers: list[int], b: int) -> list[tuple[list[int], int, int]]:
    """The groups of rule 2, largest first: (their peers, digit a_l, power p_l)."""
    groups, start, power = [], 0, 0
    while b ** (power + 1) <= len(peers):
        power += 1
    remaining = len(peers)
    for p in range(power, -1, -1):
        digit, remaining = divmod(remaining, b**p)
        if digit:
            size = digit * b**p
            groups.append((peers[start:start + size], digit, p))
            start += size
    return groups


def _side_by_side(schedules: list[Schedule]) -> Schedule:
    """Disjoint schedules run at once; the shorter ones idle at the end."""
    rounds: Schedule = []
    for schedule in schedules:
        _add(rounds, 0, schedule)
    return rounds


def _add(rounds: Schedule, start: int, schedule: Schedule) -> None:
    """Merge ``schedule`` into ``rounds`` from round ``start`` on (their peers are disjoint)."""
    while len(rounds) < start + len(schedule):
        rounds.append([])
    for offset, meetings in enumerate(schedule):
        rounds[start + offset].extend(meetings)
