"""Compressed gossip with error feedback: CHOCO-gossip with per-link public copies (docs/algorithms.md#compressed-gossip).

For each neighbour j, peer i keeps ``x̂_ij``, the copy of its own model that j holds, and
``x̂_ji``, its copy of j's model. A step sends ``q = C(x_i - x̂_ij)`` to j, both ends add q to
x̂_ij, and i moves towards its neighbours with the consensus step size g:

    x_i <- x_i + g * sum_j W_ij (x̂_ji - x̂_ij)

On a symmetric graph the two terms of a link cancel in the sum over peers, so the average
model is preserved; what the codec dropped stays in ``x_i - x̂_ij`` and is sent later.

The paper keeps one public copy per peer, which every neighbour must track exactly. Copies
per link are what make it work on a real network:

- every delta names the version of the copy it applies to, and a copy advances only when
  the receiver confirms it applied the delta (each send is a request with a reply);
- a receiver whose copy is at another version, or that has none (a new neighbour), answers
  ``resync`` and is sent a full copy at once; so is a link whose reply never came;
- a full copy is the model through a dense codec (int8 for a lossy ``codec``); both ends set
  the copy to what the receiver decodes, so it need not be exact, only the same;
- the state of a link is freed as soon as the neighbourhood no longer links the two peers;
- copies follow versions, not gossip steps: a delta is applied however far ahead or behind its
  step is, so two peers whose rounds drifted apart keep their copies of each other exact, and
  when the one behind moves on to the other's round they mix again with nothing to reset.

With ``eta`` (EControl, Gao, Islamov and Stich 2024) the sender also keeps the error of its
past compressions, ``e``, and sends ``q = C(eta * e + x_i - x̂_ij)``, then
``e <- e + x_i - x̂_ij - q``. EControl was written for workers and a server; running one per
link of a gossip graph is this project's adaptation. With ``eta = 0`` it is CHOCO.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import torch

from gossip.codecs import BlockInt8, ChunkTopK, Codec, CodecError, Identity, RandK, TopK
from gossip.exchange import (
    Exchange,
    StepInbox,
    StepResult,
    admitted,
    claims_past_end,
    message_seed,
    most_have_reached,
    reject_model,
)
from gossip.learner import State
from gossip.message import Message, PeerId
from gossip.model_codec import FlatModel, codec_for
from gossip.neighbourhood import Neighbourhood
from gossip.robust import screen
from gossip.transport import Clock, PeerUnreachable, Transport
from gossip.validation import InvalidState

log = logging.getLogger(__name__)

CHOCO = "choco"
APPLIED, RESYNC = "applied", "resync"


@dataclass
class OutLink:
    """Our model as one neighbour holds it."""

    copy: torch.Tensor
    version: int
    error: torch.Tensor | None  # EControl's accumulated compression error
    in_sync: bool = True  # False: the next message is a full copy


@dataclass
class InLink:
    """One neighbour's model as we hold it."""

    copy: torch.Tensor
    version: int


class ChocoExchange(Exchange):
    def __init__(
        self,
        transport: Transport,
        clock: Clock,
        neighbourhood: Neighbourhood,
        reference: State,
        *,
        timeout: float,
        codec: Codec,
        consensus_step: float,
        eta: float = 0.0,
    ):
        if not 0 < consensus_step <= 1:
            raise ValueError(f"consensus step must be in (0, 1], got {consensus_step}")
        if not 0 <= eta <= 1:
            raise ValueError(f"EControl's eta must be in [0, 1], got {eta}")
        self.transport = transport
        self.clock = clock
        self.neighbourhood = neighbourhood
        self.timeout = timeout
        self.codec = codec
        self.full_codec: Codec = Identity() if codec.lossless else BlockInt8()
        self.consensus_step = consensus_step
        self.eta = eta
        self.out_links: dict[PeerId, OutLink] = {}
        self.in_links: dict[PeerId, InLink] = {}
        self._flat = FlatModel(reference)
        self._versions = 0  # never reused, so a delayed delta cannot match a newer copy
        self._inbox = StepInbox()
        transport.serve(CHOCO, self._receive)

    # -- sending -------------------------------------------------------------------------------

    def _next_version(self) -> int:
        self._versions += 1
        return self._versions

    def _full_copy(self, peer: PeerId, step: int, x: torch.Tensor) -> tuple[Message, OutLink]:
        version = self._next_version()
        seed = message_seed(self.transport.peer_id, peer, version)
        parts = self.full_codec.encode(x, seed)
        copy = self.full_codec.decode(parts, x.shape, x.dtype, seed)
        error = torch.zeros_like(x) if self.eta else None
        message = Message(
            CHOCO, self.transport.peer_id, step, parts,
            meta={"seed": seed, "version": version, "full": True}, codec=self.full_codec.spec,
        )
        return message, OutLink(copy, version, error)

    def _delta(self, peer: PeerId, step: int, x: torch.Tensor, link: OutLink) -> tuple[Message, OutLink]:
        version = self._next_version()
        seed = message_seed(self.transport.peer_id, peer, version)
        residual = x - link.copy
        target = residual if link.error is None else residual + self.eta * link.error
        parts = self.codec.encode(target, seed)
        q = self.codec.decode(parts, x.shape, x.dtype, seed)
        error = None if link.error is None else link.error + residual - q
        message = Message(
            CHOCO, self.transport.peer_id, step, parts,
            meta={"seed": seed, "version": version, "base": link.version}, codec=self.codec.spec,
        )
        return message, OutLink(link.copy + q, version, error)

    async def _push(self, peer: PeerId, step: int, x: torch.Tensor) -> None:
        link = self.out_links.get(peer)
        message, advanced = self._full_copy(peer, step, x) if link is None or not link.in_sync else self._delta(peer, step, x, link)
        try:
            status = await self._request(peer, message)
            if status == RESYNC and not message.meta.get("full"):
                message, advanced = self._full_copy(peer, step, x)
                status = await self._request(peer, message)
        except (PeerUnreachable, TimeoutError) as reason:
            # The delta may or may not have been applied: only a full copy is safe next time.
            log.info("%s: no answer from %s: %s", self.transport.peer_id, peer, reason)
            if link is not None:
                link.in_sync = False
            self.neighbourhood.unreachable(peer)
            return
        if status == APPLIED:
            self.out_links[peer] = advanced
        elif link is not None:
            link.in_sync = False

    async def _request(self, peer: PeerId, message: Message) -> str:
        async with self.clock.timeout(self.timeout):
            reply = await self.transport.request(peer, message, self.timeout)
        return str(reply.meta.get("status"))

    # -- receiving -----------------------------------------------------------------------------

    def _reply(self, step: int, status: str) -> Message:
        return Message(CHOCO, self.transport.peer_id, step, meta={"status": status})

    def _apply(self, message: Message) -> InLink | None:
        """The sender's copy after this message, or None when ours is not at the delta's base."""
        meta = message.meta
        seed, version = meta.get("seed"), meta.get("version")
        if type(seed) is not int or type(version) is not int:
            raise InvalidState(f"seed and version must be integers, got {seed!r} and {version!r}")
        try:
            codec = codec_for(message.codec)
        except CodecError as reason:
            raise InvalidState(str(reason)) from None
        decoded = self._flat.decode(codec, message.tensors, seed)
        if meta.get("full") is True:
            return InLink(decoded, version)
        link = self.in_links.get(message.sender)
        if link is None or meta.get("base") != link.version:
            return None
        copy = link.copy + decoded.to(link.copy.device)
        if not bool(torch.isfinite(copy).all()):
            raise InvalidState("the delta makes the model overflow to infinity")
        return InLink(copy, version)

    async def _receive(self, message: Message) -> Message:
        sender = message.sender
        if not admitted(self.transport, self.neighbourhood, message):
            return self._reply(message.round, RESYNC)
        if claims_past_end(self.transport, self._inbox.end, message):
            return self._reply(message.round, RESYNC)
        try:
            link = self._apply(message)
        except InvalidState as reason:
            reject_model(self.transport, message, reason)
            return self._reply(message.round, RESYNC)
        # A copy is a whole model: only peers we gossip with get one (a view that lags ours
        # gets resync until it catches up).
        if link is None or sender not in self.neighbourhood.linked(message.round):
            return self._reply(message.round, RESYNC)
        self.in_links[sender] = link
        self._inbox.put(Message(CHOCO, sender, message.round))
        return self._reply(message.round, APPLIED)

    # -- the step ------------------------------------------------------------------------------

    def _forget_unlinked(self, step: int) -> None:
        linked = self.neighbourhood.linked(step)
        for links in (self.out_links, self.in_links):
            for peer in [p for p in links if p not in linked]:
                del links[peer]

    async def step(self, step: int, state: State, absent: frozenset[PeerId] = frozenset()) -> StepResult:
        self._forget_unlinked(step)
        x = self._flat.flatten(state)
        if bool(torch.isfinite(x).all()):
            await asyncio.gather(*(self._push(peer, step, x) for peer in self.neighbourhood.out_neighbours(step)))
        else:
            # Neighbours would refuse it, and it must not reach their copies of us.
            log.error("%s: the local model is NaN or infinite (training diverged; try a lower --lr); not sent", self.transport.peer_id)
        weights = self.neighbourhood.in_weights(step)
        received = await self._inbox.collect(step, set(weights), self.clock, self.timeout, absent)
        pull = torch.zeros_like(x)
        # Our copies of the neighbours' models go through the outlier guard like whole models: an
        # absurd one is left out of this step's pull (the copy itself stays in step with its sender).
        copies = {peer: (weights[peer], {"model": self.in_links[peer].copy}) for peer in sorted(received) if peer in self.in_links}
        for peer in screen(self.transport, {"model": x}, copies, step):
            theirs = self.in_links[peer]
            ours = self.out_links.get(peer)
            # Without a link back (a directed graph), our own model stands in for our copy.
            pull.add_(theirs.copy.to(x.device) - (ours.copy if ours else x), alpha=weights[peer])
        # Not in place: a message in flight may still hold a view of x.
        mixed = self._flat.unflatten(x + self.consensus_step * pull)
        expected = frozenset(weights)
        newest = most_have_reached(step, [m.round for m in received.values()], len(expected))
        return StepResult({**state, **mixed}, expected, expected - frozenset(received), newest)


ERROR_FEEDBACK_SPECS = "none, choco, or econtrol:ETA with ETA in (0, 1]"


def parse_error_feedback(spec: str) -> float | None:
    """EControl's eta for a spec (0 for choco), or None for none; ValueError naming the valid forms."""
    if spec == "none":
        return None
    if spec == "choco":
        return 0.0
    name, _, argument = spec.partition(":")
    if name == "econtrol":
        try:
            eta = float(argument)
        except ValueError:
            eta = float("nan")
        if 0 < eta <= 1:
            return eta
    raise ValueError(f"bad error feedback {spec[:100]!r}; valid: {ERROR_FEEDBACK_SPECS}")


def default_consensus_step(codec: Codec) -> float:
    """CHOCO's consensus step size when none is given.

    Dense codecs keep nearly all of a difference, so the step is 1. A sparsifier keeps a
    fraction of it, and the step must shrink with that fraction or the peers drift apart;
    these factors are the largest that stayed stable on MNIST-1D over ratios 0.01 to 0.25
    (top-k keeps the largest entries, so it tolerates four times random-k's step; chunk top-k
    keeps the largest of each chunk, and is given top-k's).
    """
    if isinstance(codec, TopK):
        return min(1.0, 4 * float(codec.ratio))
    if isinstance(codec, ChunkTopK):
        return min(1.0, 4 * float(codec.density))
    if isinstance(codec, RandK):
        return min(1.0, float(codec.ratio))
    return 1.0
