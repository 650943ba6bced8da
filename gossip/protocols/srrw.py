"""SRRW: a self-repellent random-walk token carries the model (docs/algorithms.md#srrw; Doshi, Hu
and Eun, ICML 2023; the two-timescale SA-SRRW of Hu, Doshi and Eun, ICLR 2024).

K tokens walk the graph. The holder of a token at hop n counts its visit in the token's visit
measure with gamma_n = (n+1)^-a, takes its local steps on its own data with step size
beta_n = lr (n+1)^-b, and draws the next holder from the self-repellent kernel: the base
chain's probabilities reweighted by (x_j)^-alpha, so that the walk prefers the peers it has
visited least (``topology.walk``). Tokens at one peer at once average their models. A peer that
holds no token keeps the last model it trained, so every peer can be evaluated.

A token is handed on with an acknowledgement, and the sender keeps a custody copy until the
receiver reports that it has handed the token on in turn (or finished it). A custodian that
hears nothing for ``patience`` seconds asks the receiver; one that does not answer, or that
restarted and never saw the token, has lost it, and the custodian re-issues its copy to another
neighbour, one generation up. Copies older than what a peer has seen are dropped
(``gossip.token``), and a re-issue sends word of the new generation along the old copy's path,
so a false alarm does not leave two copies walking. The holder of a token's last hop floods
word that it is done; each peer's run ends once all K tokens are.

Words that end or redirect a walk come from any member, and a member may lie, so each is taken
only from a peer that could say it:
- A token's model passes the outlier guard (``gossip.robust``) against the last model this peer
  trained, and its generation is at most ``MAX_GENERATION_STEP`` above the newest seen here: a
  forged copy cannot carry an absurd model, nor use up the generations a re-issue needs.
- REVOKE counts only from the peer that last handed us that token (the custodian chain a
  re-issue's word travels along), within the same generation step.
- DONE names the last hop, and counts from a peer next to us on the token's path (whom we took
  it from or handed it to), or once two peers have said it; a peer with a single neighbour takes
  its word. Word of a token's end travels on only once it counts here, so one liar's word stays
  where it was said.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from gossip.conversation import Conversation
from gossip.message import Message, PeerId
from gossip.protocols.base import ROUNDS_OF_THE_SWARM, Protocol, ProtocolContext, RoundReport, Settings
from gossip.robust import screen
from gossip.token import Token, TokenError, TokenLedger, average_states, read_token, token_message
from gossip.validation import InvalidState
from topology.walk import VisitCounts, next_holder, step_size

log = logging.getLogger(__name__)

TOKEN, RECEIVED = "srrw-token", "srrw-received"  # a token handed on, and whether the receiver took it
PASSED = "srrw-passed"  # to whoever handed us a token: it went on (or finished), so their copy can go
CHECK, STATUS = "srrw-check", "srrw-status"  # a custodian asks after a token it handed on
REVOKE = "srrw-revoke"  # a newer generation of a token exists: older copies are dropped
DONE = "srrw-done"  # a token made its last hop; flooded over the graph
HELLO, WELCOME = "srrw-hello", "srrw-welcome"  # a peer that (re)joins asks which tokens exist and are done
HOLDING, GONE_ON, UNKNOWN = "holding", "passed", "unknown"  # a receiver's answer to CHECK
SUSPICION_PATIENCES = 4  # how long a peer that failed us is avoided, in patiences
DONE_TENSOR, SEEN_TENSOR = "done", "seen"  # a WELCOME's bitmasks of token ids
# Re-issues of a token between two sightings of it here: more than an unlucky walk makes, and few
# enough that the generations left for re-issues (up to 2**62) cannot be used up.
MAX_GENERATION_STEP = 64
DONE_WITNESSES = 2  # distinct peers whose word that a token is done counts without a path to vouch for it


@dataclass(frozen=True)
class WalkSettings:
    alpha: float = 5.0  # self-repellence: 0 is the base chain
    gamma_exponent: float = 0.8  # a: the visit measure's step gamma_n = (n+1)^-a
    beta_exponent: float = 0.9  # b: the model's step beta_n = lr (n+1)^-b; b > a for the variance gain
    tokens: int = 1
    stay: float = 0.0  # probability the base chain keeps the token where it is
    patience: float = 30.0  # seconds a custodian waits for word before it asks after its token

    def __post_init__(self) -> None:
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        for name, value in (("a", self.gamma_exponent), ("b", self.beta_exponent)):
            if not 0.5 < value <= 1:
                raise ValueError(f"the step-size exponent {name} must be in (0.5, 1], got {value}")
        if self.tokens < 1:
            raise ValueError(f"tokens must be at least 1, got {self.tokens}")
        if not 0 <= self.stay < 1:
            raise ValueError(f"stay must be in [0, 1), got {self.stay}")
        if not self.patience > 0:
            raise ValueError(f"patience must be > 0 seconds, got {self.patience}")


@dataclass
class _Custody:
    token: Token  # the token as it was before it moved: what a re-issue starts from
    sent: tuple[int, int]  # the (generation, hop) it was handed on as
    successor: PeerId
    released: asyncio.Event


def start_peer(peers: list[PeerId], token: int, seed: int) -> PeerId:
    """Where token ``token`` starts: drawn from the run's seed, so every peer agrees."""
    return random.Random(f"{seed}:token:{token}").choice(sorted(peers))


@dataclass(frozen=True)
class HopDecay:
    """A walking token's step size beta_n = lr (n+1)^-b at its hop n >= 1, where the holder of
    hop n takes steps (n-1) * steps_per_hop onwards (docs/algorithms.md#srrw)."""

    steps_per_hop: int
    exponent: float

    def factor(self, step: int) -> float:
        hop = step // self.steps_per_hop + 1
        return (hop + 1) ** -self.exponent


class SRRW(Protocol):
    name = "srrw"
    label = "SRRW (self-repellent random-walk token)"
    own_settings = {
        "alpha": (float, Field(
            5.0, ge=0, description="srrw: how strongly the token avoids peers it visited often; 0 is a plain walk"
        )),
        "srrw_a": (float, Field(
            0.8, gt=0.5, le=1, description="srrw: the visit counts' step size is (n+1)^-A at hop n (A in (0.5, 1])"
        )),
        "srrw_b": (float, Field(
            0.9, gt=0.5, le=1, description="srrw: the model's step size is lr (n+1)^-B at hop n (B in (0.5, 1]; B > A)"
        )),
        "tokens": (int, Field(1, ge=1, description="srrw: tokens walking at once; their models average where two meet")),
        "srrw_stay": (float, Field(
            0.0, ge=0, lt=1,
            description="srrw: probability that the token stays where it is (a lazy walk: needed on an even ring)",
        )),
    }
    takes = {"topology": "", "weights": ""}
    refuses = {
        "duration": ROUNDS_OF_THE_SWARM,
        "gossip_steps": "a token is handed on once per visit; --gossip-steps applies to gossip",
        "lr_schedule": "the step size is lr (n+1)^-B at hop n (see --srrw-b), not --lr-schedule",
    }
    catches_up = False
    one_model = True
    mixes_neighbours = False
    holders = True
    round_word = "hops"
    final_label = "the tokens' last models"

    @classmethod
    def build(cls, context: ProtocolContext, settings: Settings, *, peers: list[PeerId], joining: bool) -> SRRW:
        walk = WalkSettings(
            alpha=settings.alpha, gamma_exponent=settings.srrw_a, beta_exponent=settings.srrw_b,
            tokens=settings.tokens, stay=settings.srrw_stay, patience=settings.exchange_timeout,
        )
        return cls(context, local_steps=settings.local_steps, settings=walk, peers=peers, seed=settings.seed, joining=joining)

    @classmethod
    def check(cls, settings: Settings) -> None:
        """What a walking token has no use for is refused, with the reason."""
        if not settings.gossip.codec.lossless:
            raise ValueError(
                "srrw: a token's model would lose precision at every hop with nothing to correct it; use --codec none"
            )
        if settings.mixing != "plain":
            raise ValueError("srrw: tokens that meet average their models plainly; --mixing applies to gossip, use plain")

    @classmethod
    def check_topology(cls, topology: Any, settings: Settings) -> None:
        topology.walk_row(0, settings.srrw_stay)  # a graph the token cannot walk is refused now

    @classmethod
    def for_swarm(cls, settings: Settings, peers: int) -> dict[str, Any]:
        if settings.tokens > peers:
            raise ValueError(f"--tokens {settings.tokens} is more than the {peers} peers they would walk between")
        return {}

    @classmethod
    def learning_rate(cls, settings: Settings, schedule: Any) -> HopDecay:
        return HopDecay(settings.local_steps, settings.srrw_b)

    @classmethod
    def describe_overlay(cls, summary: Mapping[str, Any]) -> str:
        tokens = summary["tokens"]
        return f"{summary['topology']}, {tokens} token{'s' if tokens != 1 else ''} walking, alpha {summary['alpha']:g}"

    @classmethod
    def combine(cls, figures: list[dict[str, Any]], settings: Settings) -> dict[str, Any]:
        copies = [0] * settings.tokens
        for held in (f["tokens_held"] for f in figures if f.get("up", True)):
            for token in held:
                copies[int(token)] += 1
        return {
            # Live copies of each token at the end: one each, unless a token was lost or duplicated.
            "token_copies": copies,
            "tokens_reissued": sum(f["tokens_reissued"] for f in figures),
            "stale_tokens_dropped": sum(f.get("stale_tokens_dropped", 0) for f in figures),
        }

    @classmethod
    def table_rows(cls, summary: Mapping[str, Any]) -> list[tuple[str, str]]:
        return [("tokens re-issued / copies at the end", f"{summary['tokens_reissued']} / {summary['token_copies']}")]

    def enter(self, peers: list[PeerId], swarm_round: int) -> None:
        self.peers = sorted(set(peers) | {self.me})
        self.joining = swarm_round > 0

    def position(self, recorded: int, rounds: int) -> int:
        return rounds if self.finished() else recorded  # every token made its last hop: the run is complete here too

    def holds_final_model(self) -> bool:
        return True  # each peer keeps the last token model it trained

    def figures(self) -> dict[str, Any]:
        return {
            "tokens_held": self.held(), "tokens_reissued": self.reissued, "stale_tokens_dropped": self.stale_dropped,
        }

    def __init__(
        self,
        context: ProtocolContext,
        *,
        local_steps: int,
        settings: WalkSettings,
        peers: list[PeerId],
        seed: int,
        joining: bool = False,
    ):
        super().__init__(context)
        if context.neighbourhood is None:
            raise ValueError("the token walks a graph: srrw needs a neighbourhood")
        self.local_steps = local_steps
        self.settings = settings
        self.peers = list(peers)
        self.seed = seed
        self.joining = joining
        self.me = context.transport.peer_id
        self.ledger = TokenLedger()
        self.rounds = 0
        self._reference = context.learner.state()  # the layout every token's model must have
        self._trained = self._reference  # the last model this peer trained: what the outlier guard measures from
        self._rng = random.Random(f"{seed}:{self.me}")
        self._present: dict[int, Token] = {}  # tokens at this peer: arrived and not yet taken by a next holder
        self._custody: dict[int, _Custody] = {}
        self._successor: dict[int, PeerId] = {}  # whom we last handed each token to: where word of it goes on
        self._predecessor: dict[int, PeerId] = {}  # whom we last took each token from
        self._done_said: dict[int, set[PeerId]] = {}  # who said a token is done, while that does not count yet
        self._done: set[int] = set()
        self._all_done = asyncio.Event()
        self._suspected: dict[PeerId, float] = {}  # peers that did not answer, until when they are avoided
        self._learner_lock = asyncio.Lock()
        self._started = asyncio.Event()
        # Closed when run() returns: what comes after is ignored, and nothing it started walks on.
        self.talk = Conversation(context.transport, context.clock, timeout=context.gossip.timeout, logger=log)
        self.reissued = 0  # tokens this peer re-issued after losing sight of them
        self.stale_dropped = 0  # copies dropped because a newer one exists
        for kind, handler in (
            (TOKEN, self._on_token), (PASSED, self._on_passed), (CHECK, self._on_check), (REVOKE, self._on_revoke),
            (DONE, self._on_done), (HELLO, self._on_hello),
        ):
            context.transport.serve(kind, handler)

    def finished(self) -> bool:
        """Whether every token has made its last hop."""
        return self._all_done.is_set()

    def held(self) -> dict[int, tuple[int, int]]:
        """The tokens at this peer now, with the (generation, hop) of each: the live copies."""
        return {token.id: token.key for token in self._present.values() if not self.ledger.obsolete(token)}

    # --- the peer's life ---------------------------------------------------------------

    async def run(self, rounds: int, first_round: int = 0) -> None:
        self.rounds = rounds
        self._started.set()
        try:
            # A peer that (re)joins a walk under way asks which tokens its neighbours know of, and
            # starts only those that nobody has seen: a token's start peer that was slow to come up
            # still starts it, and one that restarted does not start it again.
            known = await self._hello() if self.joining else set()
            for token_id in range(self.settings.tokens):
                if token_id not in known and start_peer(self.peers, token_id, self.seed) == self.me:
                    token = Token(token_id, 0, 0, self.context.learner.state(), VisitCounts.uniform(self.peers))
                    self.ledger.note(token_id, token.key)
                    self._present[token_id] = token
                    self.talk.spawn(self._carry(token, visit=False))
            await self._all_done.wait()
            # Word that a token went on or is done must reach the others before we stop, or they
            # would take the token for lost and re-issue it (each send is bounded by its timeout).
            await self.talk.drain()
        finally:
            await self.talk.aclose()

    async def _ready(self) -> bool:
        await self._started.wait()
        return not self.talk.closed

    # --- carrying a token ----------------------------------------------------------------

    async def _carry(self, token: Token, *, visit: bool) -> None:
        """Visit (unless the token is only passing through), then hand the token on."""
        while True:
            if visit:
                if not await self._visit(token):
                    return
                if token.hop >= self.rounds:
                    self._finish(token)
                    return
            if self._dropped(token):
                return
            holder = self._next_holder(token)
            if holder is None:
                await self._wait_for_a_neighbour()
                visit = False
                continue
            if holder == self.me:  # the walk stays here: another visit, no message
                token.hop += 1
                self.ledger.note(token.id, token.key)
                visit = True
                continue
            if await self._hand_over(token, holder):
                return
            visit = False  # nobody took it: draw again among the others

    async def _visit(self, token: Token) -> bool:
        """Count the visit and train on our data; False when the token turned out to be stale."""
        learner, steps = self.context.learner, self.local_steps
        async with self._learner_lock:
            if self._dropped(token):
                return False
            token.counts.visit(self.me, step_size(token.hop, self.settings.gamma_exponent))
            self._meet(token)
            learner.load_state(token.state)
            learner.reset_optimizer()  # momentum belongs to this peer's last token, not to this one
            learner.set_progress((token.hop - 1) * steps)  # the step size beta_n follows the token's hop
            loss = await self.context.clock.compute(learner.train, steps, steps=steps)
            token.state = self._trained = learner.state()
            await self.context.round_finished(RoundReport(token.hop - 1, loss, local_steps=steps))
        return True

    def _meet(self, token: Token) -> None:
        """Tokens that meet at a peer average their models."""
        here = [other for other in self._present.values() if other is not token and not self.ledger.obsolete(other)]
        if here:
            mean = average_states([token.state, *(other.state for other in here)])
            for each in (token, *here):
                each.state = mean

    def _next_holder(self, token: Token) -> PeerId | None:
        """Draw where the token goes next among the neighbours not suspected; None: wait."""
        now = self.context.clock.now()
        row = {
            peer: p for peer, p in self.context.neighbourhood.walk_row(self.settings.stay).items()
            if peer == self.me or self._suspected.get(peer, -math.inf) <= now
        }
        if any(p > 0 for p in row.values()):
            return next_holder(row, token.counts, self.settings.alpha, self._rng)
        # No neighbour answered lately. While someone keeps a copy of the token, the walk goes on
        # here; the only copy (a re-issued token) waits for a neighbour, since a crash here would lose it.
        return self.me if token.came_from is not None else None

    async def _wait_for_a_neighbour(self) -> None:
        now = self.context.clock.now()
        lapses = (until for until in self._suspected.values() if until > now)
        await self.context.clock.sleep(min(lapses, default=now + self.settings.patience) - now)

    async def _hand_over(self, token: Token, peer: PeerId) -> bool:
        """Hand the token to ``peer``, keeping custody; False when it did not take it."""
        moved = token.copy()
        moved.hop += 1
        unanswered = f"{peer} did not take token {token.id}"
        reply = await self.talk.ask(peer, token_message(TOKEN, self.me, moved), unanswered=unanswered)
        if reply is None:
            self._suspect(peer)
            if self._dropped(token):  # word of a newer copy came while we waited: nothing to re-issue
                return True
            # It may hold the copy all the same (a lost acknowledgement): ours outranks it from now on.
            self._reissue(token)
            self.talk.tell(peer, self._word(REVOKE, token.id, token.key))
            return False
        if reply.kind != RECEIVED or reply.meta.get("taken") is not True:
            # The receiver knows a newer copy of this token: ours is stale.
            self._release(token, stale=True)
            return True
        self.ledger.note(moved.id, moved.key)
        if self._present.get(token.id) is token:
            del self._present[token.id]
        self._successor[token.id] = peer
        self._end_custody(token.id)
        custody = self._custody[token.id] = _Custody(token, moved.key, peer, asyncio.Event())
        self.talk.spawn(self._watch(custody))
        self._release(token)
        return True

    def _reissue(self, token: Token) -> None:
        token.generation = self.ledger.next_generation(token)
        self.ledger.note(token.id, token.key)
        self.reissued += 1

    def _dropped(self, token: Token) -> bool:
        """Whether this copy no longer walks: another took its place here, it is done, or it is stale."""
        if self._present.get(token.id) is not token:
            return True
        if self.ledger.obsolete(token):
            self._release(token, stale=True)
            return True
        return False

    def _release(self, token: Token, *, stale: bool = False) -> None:
        """The token leaves our hands: tell whoever handed it to us to drop their copy."""
        if stale:
            if self._present.get(token.id) is token:
                del self._present[token.id]
            self.stale_dropped += 1
        if token.came_from is not None:
            sender, key = token.came_from
            token.came_from = None
            self.talk.tell(sender, self._word(PASSED, token.id, key))

    def _finish(self, token: Token) -> None:
        """The token made its last hop: it rests here, and everyone hears that it is done (every
        peer this one can reach, and each of them tells its neighbours: crashes may have cut the
        graph, not the network)."""
        self._release(token)
        self._mark_done(token.id, token.generation, also=self.context.transport.reachable())

    def _mark_done(self, token_id: int, generation: int, also: list[PeerId] = ()) -> None:
        if token_id in self._done:
            return
        self._done.add(token_id)
        self._done_said.pop(token_id, None)
        self._end_custody(token_id)
        word = self._word(DONE, token_id, (generation, self.rounds))
        for peer in sorted(self.context.neighbourhood.linked(0) | set(also)):
            self.talk.tell(peer, word)
        if len(self._done) >= self.settings.tokens:
            self._all_done.set()

    # --- custody -------------------------------------------------------------------------

    async def _watch(self, custody: _Custody) -> None:
        """Wait for word that the token went on; ask after it when none comes; re-issue a lost one."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with self.context.clock.timeout(self.settings.patience):
                    await custody.released.wait()
            if custody.released.is_set() or self._custody.get(custody.token.id) is not custody:
                return
            status = await self._ask(custody)
            if status == HOLDING:
                continue
            self._end_custody(custody.token.id)
            token = custody.token
            if status == GONE_ON or token.id in self._done or self.ledger.newest.get(token.id, (-1, -1)) > custody.sent:
                return
            # Lost: the receiver is gone, or came back without it. Our copy walks on, one generation up.
            log.warning("%s: token %d was lost at %s; re-issuing it", self.me, token.id, custody.successor)
            if status is None:
                self._suspect(custody.successor)
            self._reissue(token)
            self._present[token.id] = token
            await self._carry(token, visit=False)
            return

    async def _ask(self, custody: _Custody) -> str | None:
        reply = await self.talk.ask(custody.successor, self._word(CHECK, custody.token.id, custody.sent))
        status = None if reply is None else reply.meta.get("status")
        return status if reply is not None and reply.kind == STATUS and status in (HOLDING, GONE_ON, UNKNOWN) else None

    def _end_custody(self, token_id: int) -> None:
        custody = self._custody.pop(token_id, None)
        if custody is not None:
            custody.released.set()

    def _suspect(self, peer: PeerId) -> None:
        """Avoid a peer that failed us, until it shows a sign of life or a few patiences have passed:
        long enough that two dead neighbours are not tried in turn forever."""
        self._suspected[peer] = self.context.clock.now() + SUSPICION_PATIENCES * self.settings.patience
        self.context.neighbourhood.unreachable(peer)

    # --- messages ------------------------------------------------------------------------

    def _word(self, kind: str, token_id: int, key: tuple[int, int]) -> Message:
        generation, hop = key
        return Message(kind, self.me, hop, meta={"token": token_id, "generation": generation})

    def _read_word(self, message: Message) -> tuple[int, tuple[int, int]] | None:
        """The token and (generation, hop) a control message names; None (counted) when malformed."""
        token_id, generation = message.meta.get("token"), message.meta.get("generation")
        valid = (
            type(token_id) is int and 0 <= token_id < self.settings.tokens
            and type(generation) is int and 0 <= generation < 2**62 and message.round <= self.rounds
        )
        if not valid:
            return self.talk.refuse(message, "malformed", f"it names token {token_id!r}, generation {generation!r}")
        self._suspected.pop(message.sender, None)  # a sign of life
        return token_id, (generation, message.round)

    def _plausible_generation(self, message: Message, token_id: int, generation: int) -> bool:
        """Whether ``generation`` is within reach of the newest seen here; refused (counted) otherwise."""
        if generation <= self.ledger.newest.get(token_id, (0, 0))[0] + MAX_GENERATION_STEP:
            return True
        detail = f"token {token_id}: generation {generation} is out of reach of the newest seen here"
        self.talk.refuse(message, "implausible", detail)
        return False

    async def _on_token(self, message: Message) -> Message | None:
        if not await self._ready():
            return None
        transport = self.context.transport
        try:
            token = read_token(message, self._reference, tokens=self.settings.tokens, rounds=self.rounds)
        except TokenError as reason:
            return self.talk.refuse(message, "malformed", str(reason))
        except InvalidState as reason:
            return self.talk.refuse(message, "invalid-model", str(reason))
        if not self.context.neighbourhood.admits(message.sender):
            return self.talk.refuse(message, "incompatible", "it trains another task or model", level=logging.DEBUG)
        if not self._plausible_generation(message, token.id, token.generation):
            return None
        if not screen(transport, self._trained, {message.sender: (1.0, token.state)}, token.hop):
            return None
        self._suspected.pop(message.sender, None)  # a sign of life
        if token.id in self._done or not self.ledger.note(token.id, token.key):
            detail = f"token {token.id} at {token.key} is older than one seen here"
            self.talk.refuse(message, "stale-token", detail, level=logging.INFO)
            return Message(RECEIVED, self.me, token.hop, meta={"taken": False})
        self._end_custody(token.id)  # it came back to us: our copy of an earlier hop is moot
        self._predecessor[token.id] = message.sender
        self._present[token.id] = token
        self.talk.spawn(self._carry(token, visit=True))
        return Message(RECEIVED, self.me, token.hop, meta={"taken": True})

    async def _on_passed(self, message: Message) -> None:
        word = self._read_word(message)
        if word is None:
            return
        token_id, key = word
        custody = self._custody.get(token_id)
        if custody is not None and custody.successor == message.sender and custody.sent == key:
            self._end_custody(token_id)

    async def _on_check(self, message: Message) -> Message | None:
        word = self._read_word(message)
        if word is None:
            return None
        token_id, key = word
        here = self._present.get(token_id)
        if here is not None and here.key >= key and not self.ledger.obsolete(here):
            status = HOLDING
        elif self.ledger.seen(token_id, key):
            status = GONE_ON
        else:
            status = UNKNOWN
        return Message(STATUS, self.me, message.round, meta={"status": status})

    async def _on_revoke(self, message: Message) -> None:
        word = self._read_word(message)
        if word is None:
            return
        token_id, (generation, _) = word
        if self._predecessor.get(token_id) != message.sender:
            self.talk.refuse(message, "implausible", f"token {token_id}: it did not hand us that token")
            return
        if not self._plausible_generation(message, token_id, generation) or not self.ledger.note(*word):
            return
        here = self._present.get(token_id)
        if here is not None:
            self._dropped(here)
        custody = self._custody.get(token_id)
        if custody is not None and custody.sent < word[1]:
            self._end_custody(token_id)
        successor = self._successor.get(token_id)
        if successor is not None and successor != message.sender:
            await self.talk.send(successor, self._word(REVOKE, token_id, word[1]))

    async def _on_done(self, message: Message) -> None:
        word = self._read_word(message)
        if word is None:
            return
        token_id, (generation, hop) = word
        if hop != self.rounds:
            self.talk.refuse(message, "implausible", f"token {token_id} is done at hop {self.rounds}, not {hop}")
        elif self._plausible_generation(message, token_id, generation):
            self._done_word(token_id, generation, message.sender)

    def _done_word(self, token_id: int, generation: int, sender: PeerId) -> None:
        """Word from ``sender`` that a token is done; it counts from a peer next to us on the
        token's path, or once enough peers have said it (see the module's notes)."""
        if token_id in self._done:
            return
        said = self._done_said.setdefault(token_id, set())
        said.add(sender)
        witnesses = min(DONE_WITNESSES, len(self.context.neighbourhood.linked(0)))
        path = {self._predecessor.get(token_id), self._successor.get(token_id)}
        if sender not in path and len(said) < witnesses:
            return
        here = self._present.get(token_id)
        if here is not None:  # a copy left behind: the token finished elsewhere
            self._release(here, stale=True)
        self._mark_done(token_id, generation)

    async def _on_hello(self, message: Message) -> Message:
        return Message(WELCOME, self.me, 0, {DONE_TENSOR: self._bits(self._done), SEEN_TENSOR: self._bits(self.ledger.newest)})

    def _bits(self, tokens) -> torch.Tensor:
        bits = torch.zeros(math.ceil(self.settings.tokens / 8), dtype=torch.uint8)
        for token_id in tokens:
            bits[token_id // 8] |= 1 << (token_id % 8)
        return bits

    async def _hello(self) -> set[int]:
        """Ask the neighbours which tokens are done (marked so here) and which they have seen at all."""
        hello = Message(HELLO, self.me, 0)
        peers = sorted(self.context.neighbourhood.linked(0))
        replies = await asyncio.gather(*(self.talk.ask(peer, hello) for peer in peers))
        size = math.ceil(self.settings.tokens / 8)
        known: set[int] = set()
        for reply in replies:
            if reply is None:
                continue
            done, seen = reply.tensors.get(DONE_TENSOR), reply.tensors.get(SEEN_TENSOR)
            if reply.kind != WELCOME or not all(
                bits is not None and bits.dtype == torch.uint8 and bits.shape == (size,) for bits in (done, seen)
            ):
                self.talk.refuse(reply, "malformed", "not a welcome with two bitmasks of tokens", level=logging.DEBUG)
                continue
            for token_id in range(self.settings.tokens):
                if int(done[token_id // 8]) >> (token_id % 8) & 1:
                    self._done_word(token_id, self.ledger.newest.get(token_id, (0, 0))[0], reply.sender)
                if int(seen[token_id // 8]) >> (token_id % 8) & 1:
                    known.add(token_id)
        return known | self._done
