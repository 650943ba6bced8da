"""Overlays drawn afresh every round: epidemic learning's random recipients.

Rules of the draws:

- A round's draw depends on (seed, round) and the number of peers only, never on the order in
  which peers ask, so a run replays exactly and every peer with the same view of the swarm
  computes the same draw, its own and everybody else's.
- ``el-oracle:S``: the peers are put in a fresh random order; each sends to the peers S fresh
  random distances after it in that order (mod n). Every peer sends S models and receives S:
  a random S-regular directed graph, whose uniform weights 1/(S+1) are doubly stochastic.
- ``el-local:S``: each peer draws its own S recipients, uniformly among the others, from
  (seed, round, peer); in-degrees vary from round to round and from peer to peer. A receiver
  averages its model uniformly with those it received: row i puts 1/(1 + d_i) on itself and on
  each of its d_i senders. Rows sum to one, columns need not.
- With S >= n - 1 both are the complete graph.

A round is given as rows: row i maps each j with W[i, j] > 0, i itself included, to W[i, j].
"""

from __future__ import annotations

import random

Rows = list[dict[int, float]]


def oracle_recipients(n: int, fanout: int, seed: int, round: int) -> list[list[int]]:
    """Each peer's S recipients in this round of ``el-oracle:S``, sorted."""
    if fanout >= n - 1:
        return _everybody_else(n)
    draw = random.Random(f"{seed}:el-oracle:{round}")
    order = list(range(n))
    draw.shuffle(order)
    distances = draw.sample(range(1, n), fanout)
    return [
        sorted(order[(place + distance) % n] for distance in distances)
        for place in _inverse(order)
    ]


def local_recipients(n: int, fanout: int, seed: int, round: int, peer: int) -> list[int]:
    """The S recipients ``peer`` draws itself in this round of ``el-local:S``, sorted."""
    if fanout >= n - 1:
        return [j for j in range(n) if j != peer]
    others = [j for j in range(n) if j != peer]
    return sorted(random.Random(f"{seed}:el-local:{round}:{peer}").sample(others, fanout))


def uniform_rows(recipients: list[list[int]]) -> Rows:
    """Each receiver's row: 1/(1 + d_i) on itself and on each of the d_i peers that sent to it."""
    senders: list[list[int]] = [[] for _ in recipients]
    for sender, targets in enumerate(recipients):
        for target in targets:
            senders[target].append(sender)
    rows: Rows = []
    for receiver, heard in enumerate(senders):
        weight = 1.0 / (1 + len(heard))
        rows.append({receiver: weight} | dict.fromkeys(heard, weight))
    return rows


def oracle_rows(n: int, fanout: int, seed: int, round: int) -> Rows:
    return uniform_rows(oracle_recipients(n, fanout, seed, round))


def local_rows(n: int, fanout: int, seed: int, round: int) -> Rows:
    return uniform_rows([local_recipients(n, fanout, seed, round, peer) for peer in range(n)])


def _everybody_else(n: int) -> list[list[int]]:
    return [[j for j in range(n) if j != i] for i in range(n)]


def _inverse(order: list[int]) -> list[int]:
    """place[p]: where peer p stands in ``order``."""
    place = [0] * len(order)
    for index, peer in enumerate(order):
        place[peer] = index
    return place
