"""A walking token as data: what it carries, how it travels, and which copy of it is current.

A token carries a model, the visit counts of its walk (``topology.walk.VisitCounts``), its hop
counter (the moves it has made), its id (one of the run's K tokens) and its generation (raised
each time a lost token is re-issued). Nothing here does I/O, so every rule is testable alone;
``gossip.protocols.srrw`` moves tokens between peers.

Which copy is current: every peer remembers the highest (generation, hop) it has seen of each
token, and a copy below it is obsolete. A token's hop only grows as it walks, and a re-issued
token outranks every copy of the generation before it, so a copy left behind by a false
timeout, or sent back in time by a stranger, is dropped wherever newer word has arrived.

On the wire: the model's tensors, the peers of the count table as msgpack (a list of ids, in a
uint8 tensor) beside their log counts (float64), the table's log scale and the token's id and
generation in the metadata, and the hop as the message's round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import msgpack
import torch

from gossip.learner import State
from gossip.message import Message, PeerId
from gossip.validation import check_state
from gossip.view import MAX_PEER_ID_LENGTH
from topology.walk import VisitCounts

PEERS_TENSOR, COUNTS_TENSOR = "walk-peers", "walk-counts"
MAX_TABLE_PEERS = 16_384
MAX_GENERATION = 2**62


class TokenError(ValueError):
    """A token message that must not be taken: malformed, or outside what this run allows."""


@dataclass
class Token:
    id: int
    generation: int
    hop: int  # moves made; the holder of hop n >= 1 visits it (hop 0 is where the token starts)
    state: State
    counts: VisitCounts
    # Who handed it to us, and as which (generation, hop): word goes back when it leaves us.
    came_from: tuple[PeerId, tuple[int, int]] | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple[int, int]:
        return self.generation, self.hop

    def copy(self) -> Token:
        counts = VisitCounts(dict(self.counts.log_counts), self.counts.log_scale)
        return Token(self.id, self.generation, self.hop, dict(self.state), counts, self.came_from)


class TokenLedger:
    """The newest (generation, hop) this peer has seen of each token."""

    def __init__(self) -> None:
        self.newest: dict[int, tuple[int, int]] = {}

    def note(self, token: int, key: tuple[int, int]) -> bool:
        """Record word of a copy; True when it is newer than anything seen of that token."""
        if key <= self.newest.get(token, (-1, -1)):
            return False
        self.newest[token] = key
        return True

    def obsolete(self, token: Token) -> bool:
        return self.newest.get(token.id, (-1, -1)) > token.key

    def seen(self, token: int, key: tuple[int, int]) -> bool:
        """Whether this peer has seen this copy of the token, or a newer one."""
        return self.newest.get(token, (-1, -1)) >= key

    def next_generation(self, token: Token) -> int:
        """The generation of a re-issue of ``token``: above every copy of it seen here."""
        return max(token.generation, self.newest.get(token.id, (0, 0))[0]) + 1


def average_states(states: list[State]) -> State:
    return {name: sum(state[name] for state in states) / len(states) for name in states[0]}


def token_message(kind: str, sender: PeerId, token: Token) -> Message:
    counts = token.counts.log_counts
    peers = msgpack.packb(list(counts), use_bin_type=True)
    tensors = {
        **token.state,
        PEERS_TENSOR: torch.frombuffer(bytearray(peers), dtype=torch.uint8),
        COUNTS_TENSOR: torch.tensor(list(counts.values()), dtype=torch.float64),
    }
    meta = {"token": token.id, "generation": token.generation, "log_scale": token.counts.log_scale}
    return Message(kind, sender, token.hop, tensors, meta=meta)


def read_token(message: Message, reference: State, *, tokens: int, rounds: int) -> Token:
    """The token a message carries, checked against this run; TokenError (or InvalidState for the
    model) when anything is malformed or out of range."""
    meta = message.meta
    token_id, generation, log_scale = meta.get("token"), meta.get("generation"), meta.get("log_scale")
    if not _is_int(token_id) or not 0 <= token_id < tokens:
        raise TokenError(f"token id {token_id!r} is not one of this run's {tokens} tokens")
    if not _is_int(generation) or not 0 <= generation < MAX_GENERATION:
        raise TokenError(f"generation {generation!r} is not an integer in [0, 2**62)")
    if not 1 <= message.round <= rounds:
        raise TokenError(f"hop {message.round} is outside this run's hops 1..{rounds}")
    if not isinstance(log_scale, float | int) or isinstance(log_scale, bool):
        raise TokenError(f"log scale {log_scale!r} is not a number")
    if not 0 <= log_scale <= max_log_scale(message.round):
        raise TokenError(f"log scale {log_scale!r} is outside what {message.round} hops can make")
    table = {name: tensor for name, tensor in message.tensors.items() if name in (PEERS_TENSOR, COUNTS_TENSOR)}
    counts = _read_counts(table, float(log_scale))
    model = {name: tensor for name, tensor in message.tensors.items() if name not in table}
    check_state(model, reference)
    return Token(token_id, generation, message.round, model, counts, came_from=(message.sender, (generation, message.round)))


def max_log_scale(hop: int) -> float:
    """A bound on log W_n = -sum_{t<=n} log(1 - (t+1)^-a) for any a in (0.5, 1]: at most about
    2 sqrt(n+1) + log(n+1) + 2."""
    return 2 * math.sqrt(hop + 1) + math.log(hop + 1) + 2


def _read_counts(table: dict[str, torch.Tensor], log_scale: float) -> VisitCounts:
    raw, values = table.get(PEERS_TENSOR), table.get(COUNTS_TENSOR)
    if raw is None or raw.dtype != torch.uint8 or raw.dim() != 1:
        raise TokenError(f"no {PEERS_TENSOR!r} tensor of bytes")
    if values is None or values.dtype != torch.float64 or values.dim() != 1:
        raise TokenError(f"no {COUNTS_TENSOR!r} float64 vector")
    try:
        peers = msgpack.unpackb(
            raw.numpy().tobytes(), raw=False, max_str_len=MAX_PEER_ID_LENGTH, max_bin_len=0, max_ext_len=0,
            max_map_len=0, max_array_len=MAX_TABLE_PEERS,
        )
    except ValueError as error:
        raise TokenError(f"count table does not unpack: {str(error) or type(error).__name__}") from None
    if not isinstance(peers, list) or not all(isinstance(peer, str) and peer for peer in peers):
        raise TokenError("the count table's peers are not a list of non-empty strings")
    if not peers:
        raise TokenError("the count table is empty")
    if len(set(peers)) != len(peers):
        raise TokenError("the count table lists a peer twice")
    if len(peers) != len(values):
        raise TokenError(f"the count table has {len(peers)} peers but {len(values)} counts")
    # A count starts at -log(table size) and only grows, and together they make the scale: a
    # count outside that range is forged (and could make the kernel overflow).
    if not bool(((values >= -math.log(MAX_TABLE_PEERS) - 1) & (values <= log_scale + 1)).all()):
        raise TokenError(f"the count table holds a count outside [-log {MAX_TABLE_PEERS}, its log scale]")
    return VisitCounts(dict(zip(peers, values.tolist())), log_scale)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

