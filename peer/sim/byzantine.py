"""Attackers in the simulator: peers that gossip crafted models (docs/algorithms.md#robust-mixing).

``--byzantine F:ATTACK`` makes round(F * peers) of the initial peers, drawn from the seed,
attackers. They are omniscient, as in the robustness literature (He, Karimireddy and Jaggi,
arXiv 2202.01545): every honest peer's transport is tapped, so the attackers see the model
each honest peer sends at each gossip step. At every step an attacker sends each of its
honest neighbours (its targets) a model crafted for that target, as an ordinary gossip
model message: same kind, step numbering and codec as the honest exchange. On an overlay drawn
every round the targets are the round's draw; ``F:ATTACK:targeted`` makes every attacker send to
the same S honest victims every round instead (``targeted_topology``), which the victims mix.

With x_i the target's model, H_i the honest models around it (x_i and those of its honest
in-neighbours, as He et al. take them; x_i keeps the set from being empty), and mean and
std taken per coordinate over H_i (the population std, defined for one model):

    signflip        -mean(H_i): the honest model with its sign flipped (ipm with EPS = 1)
    alie:Z          mean(H_i) - Z * std(H_i)                  (Baruch et al., 2019)
    ipm:EPS         -EPS * mean(H_i)                          (Xie et al., 2020)
    dissensus:EPS   x_i - EPS * sum_{honest j} W_ij (x_j - x_i) / sum_{attackers k} W_ik
    noise:SCALE     mean(H_i) plus Gaussian noise of std SCALE per coordinate
    huge            every value 1e30

Attackers train nothing and record nothing: a run's metrics are the honest peers'.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from gossip.codecs import Identity
from gossip.exchange import MODEL, message_seed
from gossip.greeting import BYE, HELLO
from gossip.learner import State
from gossip.message import Message, PeerId
from gossip.model_codec import ModelMessages
from gossip.protocols.base import Protocol, ProtocolContext
from gossip.transport import Clock, Handler, PeerUnreachable, Transport
from gossip.validation import InvalidState
from topology import Topology, is_drawn

log = logging.getLogger(__name__)

# The attacks, and whether each takes a parameter.
ATTACKS = {"signflip": False, "alie": True, "ipm": True, "dissensus": True, "noise": True, "huge": False}
VALID_SPECS = (
    "F:ATTACK[:targeted] with F in (0, 1) and ATTACK one of signflip, alie:Z, ipm:EPS, dissensus:EPS, noise:SCALE, huge"
)
TARGETED = ":targeted"
HUGE = 1e30  # finite in float32, so it passes a receiver's checks and lands in its average


class ByzantineError(ValueError):
    """A ``--byzantine`` spec that does not parse or does not fit the run; the message says why."""


@dataclass(frozen=True)
class ByzantineSpec:
    fraction: float
    attack: str
    parameter: float | None = None  # Z, EPS or SCALE; None for the attacks without one
    targeted: bool = False  # on a drawn overlay, the same victims every round instead of the draw's

    def count(self, peers: int) -> int:
        """Attackers among ``peers``: the fraction rounded to the nearest whole peer (0.2 of 16 is 3)."""
        return round(self.fraction * peers)


def parse_byzantine(spec: str) -> ByzantineSpec | None:
    """The attack a spec names; None for ``none``; ByzantineError naming what is wrong otherwise."""
    if spec == "none":
        return None
    targeted = spec.endswith(TARGETED)
    parsed = _parse_attack(spec.removesuffix(TARGETED) if targeted else spec, spec)
    return replace(parsed, targeted=targeted)


def _parse_attack(text: str, spec: str) -> ByzantineSpec:
    fraction_text, _, attack_text = text.partition(":")
    attack, has_parameter, parameter_text = attack_text.partition(":")
    fraction = _number(fraction_text)
    if fraction is None or not 0 < fraction < 1:
        raise ByzantineError(
            f"bad attack spec {spec[:60]!r}: the fraction F must be a number in (0, 1); write {VALID_SPECS}"
        )
    if attack not in ATTACKS:
        raise ByzantineError(f"bad attack spec {spec[:60]!r}: unknown attack {attack[:30]!r}; write {VALID_SPECS}")
    if not ATTACKS[attack]:
        if has_parameter:
            raise ByzantineError(f"bad attack spec {spec[:60]!r}: {attack} takes no parameter; write {VALID_SPECS}")
        return ByzantineSpec(fraction, attack)
    parameter = _number(parameter_text)
    if parameter is None or parameter <= 0:
        raise ByzantineError(
            f"bad attack spec {spec[:60]!r}: {attack} takes a positive number, e.g. {attack}:1; write {VALID_SPECS}"
        )
    return ByzantineSpec(fraction, attack, parameter)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def check_byzantine(
    spec: ByzantineSpec, *, peers: int, algorithm: str, attackable: bool, error_feedback: str, simulated_for: list[str],
    topology: str,
) -> None:
    """ByzantineError when the attackers do not fit the run: the protocol (``attackable``: the
    simulator has attackers for it; ``simulated_for``: the protocols it has them for), the
    exchange, the swarm's size, the overlay (``targeted`` needs one drawn every round)."""
    if spec.targeted and not is_drawn(topology):
        raise ByzantineError(
            f"--byzantine ...{TARGETED}: on --topology {topology} the attackers' neighbours are the same every round "
            "already; targeted attackers are for a drawn overlay (el-oracle:S, el-local:S)"
        )
    if not attackable:
        raise ByzantineError(
            f"--byzantine: attackers are simulated for the protocols {' and '.join(simulated_for)}, not {algorithm}"
        )
    if error_feedback != "none":
        raise ByzantineError(
            f"--byzantine: attackers send whole models, which --error-feedback {error_feedback} does not; "
            "use --error-feedback none or a lossless --codec"
        )
    count = spec.count(peers)
    if not 0 < count < peers:
        raise ByzantineError(
            f"--byzantine: a fraction of {spec.fraction:g} of --peers {peers} makes {count} attackers; "
            f"choose F so that there is at least one attacker and one honest peer"
        )


def choose_attackers(spec: ByzantineSpec, peers: list[PeerId], seed: int) -> frozenset[PeerId]:
    """The attackers among ``peers``; the same for a seed, whatever the order of ``peers``."""
    return frozenset(random.Random(f"{seed}:byzantine").sample(sorted(peers), spec.count(len(peers))))


def choose_victims(topology: Topology, ids: list[PeerId], attackers: frozenset[PeerId], seed: int) -> list[PeerId]:
    """The honest peers that targeted attackers send to every round: as many as an attacker's
    draw names (S), the same for a seed."""
    honest = [peer for peer in ids if peer not in attackers]
    fanout = len(topology.out_neighbours(ids.index(min(attackers)), 0))
    return sorted(random.Random(f"{seed}:victims").sample(honest, min(fanout, len(honest))))


def targeted_topology(topology: Topology, attackers: set[int], victims: set[int]) -> Topology:
    """A drawn ``topology`` in which every attacker sends to ``victims`` each round instead of the
    peers it drew, and each receiver still averages uniformly what it was sent: victims the
    attackers' models too, the others their honest senders only."""

    def rows(round: int) -> list[dict[int, float]]:
        mixed = []
        for i, row in enumerate(topology.rows(round)):
            senders = [j for j in row if j != i and j not in attackers] + (sorted(attackers) if i in victims else [])
            weight = 1.0 / (1 + len(senders))
            mixed.append({i: weight} | dict.fromkeys(senders, weight))
        return mixed

    return Topology(topology.spec, topology.n, None, rows)


# The attacks' arithmetic, on models flattened to vectors. ``honest`` stacks the honest models
# around the target, one per row, the target's own first.


def sign_flip(honest: torch.Tensor) -> torch.Tensor:
    return -honest.mean(dim=0)


def a_little_is_enough(honest: torch.Tensor, z: float) -> torch.Tensor:
    return honest.mean(dim=0) - z * honest.std(dim=0, correction=0)


def inner_product_manipulation(honest: torch.Tensor, eps: float) -> torch.Tensor:
    return -eps * honest.mean(dim=0)


def dissensus(
    target: torch.Tensor, neighbours: torch.Tensor, weights: torch.Tensor, attacker_weight: float, eps: float
) -> torch.Tensor:
    """Mixed in with the weight ``attacker_weight``, moves the target by -EPS times its honest neighbours' pull."""
    pull = (weights[:, None] * (neighbours - target)).sum(dim=0)
    return target - eps * pull / attacker_weight


def gaussian_noise(honest: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    mean = honest.mean(dim=0)
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    return mean + scale * noise.to(mean.device)


def huge(target: torch.Tensor) -> torch.Tensor:
    return torch.full_like(target, HUGE)


@dataclass(frozen=True)
class TargetView:
    """What an attacker knows of one target at one step, models flattened to vectors."""

    target: torch.Tensor  # x_i
    neighbours: torch.Tensor  # the honest in-neighbours' models, one per row (possibly none)
    weights: torch.Tensor  # W_ij of those neighbours, in the same order
    attacker_weight: float  # sum of W_ik over the target's attacking in-neighbours

    @property
    def honest(self) -> torch.Tensor:
        return torch.cat([self.target[None], self.neighbours])


def craft(spec: ByzantineSpec, view: TargetView, generator: torch.Generator) -> torch.Tensor:
    """The model an attacker sends this target."""
    match spec.attack:
        case "signflip":
            return sign_flip(view.honest)
        case "alie":
            return a_little_is_enough(view.honest, spec.parameter)
        case "ipm":
            return inner_product_manipulation(view.honest, spec.parameter)
        case "dissensus":
            return dissensus(view.target, view.neighbours, view.weights, view.attacker_weight, spec.parameter)
        case "noise":
            return gaussian_noise(view.honest, spec.parameter, generator)
        case "huge":
            return huge(view.target)
        case _:
            raise ByzantineError(f"unknown attack {spec.attack!r}")


class HonestModels:
    """The model each honest peer last sent, flattened, with the gossip step it was sent for."""

    def __init__(self, reference: State):
        self._messages = ModelMessages(reference, Identity())  # decodes whatever codec a message names
        self._latest: dict[PeerId, tuple[int, torch.Tensor]] = {}
        self._changed = asyncio.Event()

    def record(self, message: Message) -> None:
        if message.kind != MODEL:
            return
        latest = self._latest.get(message.sender)
        if latest is not None and latest[0] >= message.round:
            return  # the same model, sent to another neighbour
        try:
            state = self._messages.decode(message.tensors, message.codec, message.meta)
        except InvalidState:
            return  # a model wrecked by earlier attacks: its receivers refuse it, the attackers skip it
        self._latest[message.sender] = (message.round, self._messages.flat.flatten(state))
        # A new event per change, so that every waiter wakes and none misses a later change.
        self._changed.set()
        self._changed = asyncio.Event()

    def _fresh(self, peer: PeerId, step: int) -> bool:
        latest = self._latest.get(peer)
        return latest is not None and latest[0] >= step

    async def fresh(self, peers: list[PeerId], step: int, clock: Clock, timeout: float) -> dict[PeerId, torch.Tensor]:
        """The models of ``peers`` for ``step`` or later, once all have sent one or the timeout passes."""
        try:
            async with clock.timeout(timeout):
                while not all(self._fresh(peer, step) for peer in peers):
                    await self._changed.wait()
        except TimeoutError:
            pass
        return {peer: self._latest[peer][1] for peer in peers if self._fresh(peer, step)}


class TappedTransport(Transport):
    """An honest peer's transport, unchanged, except that the attackers see every model it sends."""

    def __init__(self, inner: Transport, seen: HonestModels):
        self.inner = inner
        self.seen = seen
        self.peer_id = inner.peer_id
        self.counters = inner.counters

    async def send(self, peer: PeerId, message: Message) -> None:
        self.seen.record(message)
        await self.inner.send(peer, message)

    async def request(self, peer: PeerId, message: Message, timeout: float) -> Message:
        return await self.inner.request(peer, message, timeout)

    def serve(self, kind: str, handler: Handler) -> None:
        self.inner.serve(kind, handler)

    def reachable(self) -> list[PeerId]:
        return self.inner.reachable()


@dataclass
class Adversary:
    """What the attackers of a run share: the attack, who they are, the graph and the honest models."""

    spec: ByzantineSpec
    attackers: frozenset[PeerId]
    topology: Topology
    ids: list[PeerId]  # peer i of the topology is ids[i]
    seen: HonestModels
    live: Callable[[PeerId], bool]  # whether a peer is running now (not crashed, gone or yet to join)
    seed: int

    def tap(self, transport: Transport) -> TappedTransport:
        return TappedTransport(transport, self.seen)

    def honest_in_weights(self, target: PeerId, step: int) -> tuple[dict[PeerId, float], float]:
        """W_ij of the target's live honest in-neighbours at a step, and the sum of its attackers' W_ik."""
        weights = {self.ids[j]: w for j, w in self.topology.in_weights(self.ids.index(target), step).items()}
        honest = {peer: w for peer, w in weights.items() if peer not in self.attackers and self.live(peer)}
        return honest, sum(w for peer, w in weights.items() if peer in self.attackers)


async def _drop(message: Message) -> None:
    """Whatever honest peers send an attacker (their models, hellos, goodbyes) goes unanswered."""


class Attacker(Protocol):
    """Sends each honest neighbour a crafted model at every gossip step of every round."""

    name = "attacker"

    def __init__(self, context: ProtocolContext, adversary: Adversary, *, gossip_steps: int):
        super().__init__(context)
        self.adversary = adversary
        self.gossip_steps = gossip_steps
        self.models = ModelMessages(context.learner.state(), context.gossip.codec)
        for kind in (MODEL, HELLO, BYE):
            context.transport.serve(kind, _drop)

    async def run(self, rounds: int, first_round: int = 0) -> None:
        adversary = self.adversary
        for step in range(first_round * self.gossip_steps, rounds * self.gossip_steps):
            targets = [
                peer for peer in self.context.neighbourhood.out_neighbours(step)
                if peer not in adversary.attackers and adversary.live(peer)
            ]
            await asyncio.gather(*(self._attack(target, step) for target in targets))

    async def _attack(self, target: PeerId, step: int) -> None:
        context, adversary = self.context, self.adversary
        weights, attacker_weight = adversary.honest_in_weights(target, step)
        # Wait, as the target does, for the models it will mix at this step.
        models = await adversary.seen.fresh([target, *weights], step, context.clock, context.gossip.timeout)
        if target not in models:
            return  # the target sent nothing for this step in time: it is down or far behind
        neighbours = [peer for peer in weights if peer in models]
        x = models[target]
        view = TargetView(
            target=x,
            neighbours=torch.stack([models[p] for p in neighbours]) if neighbours else x.new_empty((0, x.numel())),
            weights=torch.tensor([weights[peer] for peer in neighbours], dtype=x.dtype, device=x.device),
            attacker_weight=attacker_weight,
        )
        me = context.transport.peer_id
        generator = torch.Generator().manual_seed(message_seed(adversary.seed, me, target, step))
        crafted = self.models.flat.unflatten(craft(adversary.spec, view, generator))
        tensors, meta, codec = self.models.encode(crafted, message_seed(me, step))
        try:
            async with context.clock.timeout(context.gossip.timeout):
                await context.transport.send(target, Message(MODEL, me, step, tensors, meta=meta, codec=codec))
        except (PeerUnreachable, TimeoutError) as reason:
            log.info("%s: could not send to %s: %s", me, target, reason)
