"""A walking token as data: which copy is current, and what a token message may carry."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch

from gossip.message import Message
from gossip.token import COUNTS_TENSOR, PEERS_TENSOR, Token, TokenError, TokenLedger, read_token, token_message
from gossip.validation import InvalidState
from topology.walk import VisitCounts

TOKENS, ROUNDS = 2, 10
REFERENCE = {"x": torch.zeros(3, dtype=torch.float64)}


def token(token_id=1, generation=3, hop=5, *, model=None, counts=None, log_scale=2.5) -> Token:
    counts = counts if counts is not None else {"p0": -1.0, "p1": 0.5, "p2": 3.0}
    model = model if model is not None else torch.tensor([1.0, -2.0, 0.25], dtype=torch.float64)
    return Token(token_id, generation, hop, {"x": model}, VisitCounts(counts, log_scale))


def message(**changes) -> Message:
    """A valid token message from p7, with the given fields of the Message (or of its meta) replaced."""
    sent = token_message("srrw-token", "p7", token())
    meta = {**sent.meta, **changes.pop("meta", {})}
    for name in changes.pop("drop_meta", ()):
        del meta[name]
    tensors = {**sent.tensors, **changes.pop("tensors", {})}
    for name in changes.pop("drop_tensors", ()):
        del tensors[name]
    fields = {"kind": sent.kind, "sender": sent.sender, "round": sent.round, "tensors": tensors, "meta": meta}
    return Message(**{**fields, **changes})


def read(received: Message) -> Token:
    return read_token(received, REFERENCE, tokens=TOKENS, rounds=ROUNDS)


def peers_tensor(payload: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.zeros(0, dtype=torch.uint8)


def packed_peers(peers: list) -> torch.Tensor:
    return peers_tensor(msgpack.packb(peers, use_bin_type=True))


# --- the ledger ----------------------------------------------------------------------------


def test_the_ledger_takes_only_word_newer_than_what_it_has_seen():
    ledger = TokenLedger()
    assert ledger.note(0, (0, 3))
    assert not ledger.note(0, (0, 3))  # the same copy again
    assert not ledger.note(0, (0, 2))  # a hop that goes backwards
    assert ledger.note(0, (0, 4))
    assert ledger.newest == {0: (0, 4)}


def test_a_newer_generation_outranks_every_hop_of_an_older_one():
    ledger = TokenLedger()
    ledger.note(0, (0, 900))
    assert ledger.note(0, (1, 0))
    assert not ledger.note(0, (0, 1000))
    assert ledger.newest[0] == (1, 0)


def test_the_ledger_keeps_each_token_apart():
    ledger = TokenLedger()
    ledger.note(0, (2, 7))
    assert ledger.note(1, (0, 1))  # token 1 knows nothing of token 0's generation
    assert ledger.newest == {0: (2, 7), 1: (0, 1)}


def test_a_copy_is_obsolete_only_below_the_newest_word():
    ledger = TokenLedger()
    copy = token(token_id=0, generation=1, hop=4)
    assert not ledger.obsolete(copy)  # nothing seen of the token yet
    ledger.note(0, (1, 4))
    assert not ledger.obsolete(copy)  # the newest copy itself
    ledger.note(0, (1, 5))
    assert ledger.obsolete(copy)
    assert ledger.obsolete(token(token_id=0, generation=0, hop=9))
    assert not ledger.obsolete(token(token_id=0, generation=2, hop=0))
    assert not ledger.obsolete(token(token_id=1, generation=0, hop=0))


def test_seen_covers_the_newest_copy_and_everything_older():
    ledger = TokenLedger()
    assert not ledger.seen(0, (0, 0))
    ledger.note(0, (1, 4))
    assert ledger.seen(0, (1, 4))
    assert ledger.seen(0, (1, 3))
    assert ledger.seen(0, (0, 99))
    assert not ledger.seen(0, (1, 5))
    assert not ledger.seen(0, (2, 0))
    assert not ledger.seen(1, (0, 0))


def test_a_reissue_goes_one_generation_above_every_copy_seen():
    ledger = TokenLedger()
    assert ledger.next_generation(token(token_id=0, generation=0, hop=3)) == 1
    assert ledger.next_generation(token(token_id=0, generation=4, hop=3)) == 5
    ledger.note(0, (6, 1))  # word of a newer generation came through here
    assert ledger.next_generation(token(token_id=0, generation=4, hop=3)) == 7
    assert ledger.next_generation(token(token_id=1, generation=2, hop=3)) == 3


# --- on the wire ---------------------------------------------------------------------------


def test_a_token_survives_the_trip_through_a_message():
    sent = token(token_id=1, generation=3, hop=5, log_scale=2.5)
    received = read(token_message("srrw-token", "p7", sent))
    assert (received.id, received.generation, received.hop) == (1, 3, 5)
    assert received.state.keys() == {"x"}
    assert torch.equal(received.state["x"], sent.state["x"])
    assert received.counts.log_counts == sent.counts.log_counts
    assert list(received.counts.log_counts) == ["p0", "p1", "p2"]
    assert received.counts.log_scale == 2.5
    assert received.came_from == ("p7", (3, 5))


def test_a_token_message_carries_the_hop_as_its_round_and_names_the_kind():
    sent = token_message("srrw-token", "p7", token(hop=5))
    assert (sent.kind, sent.sender, sent.round) == ("srrw-token", "p7", 5)
    assert sent.tensors[PEERS_TENSOR].dtype == torch.uint8
    assert sent.tensors[COUNTS_TENSOR].dtype == torch.float64


def test_the_first_and_last_hops_of_a_run_are_taken():
    assert read(message(round=1)).hop == 1
    assert read(message(round=ROUNDS)).hop == ROUNDS


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"meta": {"token": TOKENS}}, id="token-id-past-the-last"),
        pytest.param({"meta": {"token": -1}}, id="negative-token-id"),
        pytest.param({"meta": {"token": True}}, id="bool-token-id"),
        pytest.param({"meta": {"token": "0"}}, id="string-token-id"),
        pytest.param({"drop_meta": ["token"]}, id="missing-token-id"),
        pytest.param({"meta": {"generation": True}}, id="bool-generation"),
        pytest.param({"meta": {"generation": -1}}, id="negative-generation"),
        pytest.param({"meta": {"generation": 2**62}}, id="huge-generation"),
        pytest.param({"meta": {"generation": 1.0}}, id="float-generation"),
        pytest.param({"drop_meta": ["generation"]}, id="missing-generation"),
        pytest.param({"round": 0}, id="hop-0"),
        pytest.param({"round": ROUNDS + 1}, id="hop-past-the-run"),
        pytest.param({"meta": {"log_scale": math.nan}}, id="nan-log-scale"),
        pytest.param({"meta": {"log_scale": math.inf}}, id="infinite-log-scale"),
        pytest.param({"meta": {"log_scale": -0.5}}, id="negative-log-scale"),
        pytest.param({"meta": {"log_scale": True}}, id="bool-log-scale"),
        pytest.param({"meta": {"log_scale": "1"}}, id="string-log-scale"),
        pytest.param({"drop_meta": ["log_scale"]}, id="missing-log-scale"),
        pytest.param({"drop_tensors": [PEERS_TENSOR]}, id="missing-peers"),
        pytest.param({"tensors": {PEERS_TENSOR: packed_peers(["p0", "p1", "p2"]).to(torch.int16)}}, id="peers-not-uint8"),
        pytest.param({"tensors": {PEERS_TENSOR: packed_peers(["p0", "p1", "p2"]).reshape(1, -1)}}, id="peers-not-1d"),
        pytest.param({"tensors": {PEERS_TENSOR: peers_tensor(b"\xc1")}}, id="peers-not-msgpack"),
        pytest.param({"tensors": {PEERS_TENSOR: peers_tensor(b"\x93\xa2p0")}}, id="peers-truncated"),
        pytest.param({"tensors": {PEERS_TENSOR: peers_tensor(b"")}}, id="peers-no-bytes"),
        pytest.param({"tensors": {PEERS_TENSOR: peers_tensor(b"\x93\xa2p0\xa2p1\xa2p2\x00")}}, id="peers-extra-bytes"),
        pytest.param({"tensors": {PEERS_TENSOR: peers_tensor(b"\x93\xa2p0\xa2p1\xa2\xff\xfe")}}, id="peers-not-utf8"),
        pytest.param({"tensors": {PEERS_TENSOR: peers_tensor(b"\x81\xa1a\x01")}}, id="peers-a-map"),
        pytest.param({"tensors": {PEERS_TENSOR: packed_peers([b"p0", b"p1", b"p2"])}}, id="peers-as-bytes"),
        pytest.param({"tensors": {PEERS_TENSOR: packed_peers("p0p1p2")}}, id="peers-not-a-list"),
        pytest.param({"tensors": {PEERS_TENSOR: packed_peers(["p0", 1, "p2"])}}, id="non-string-peer"),
        pytest.param({"tensors": {PEERS_TENSOR: packed_peers(["p0", "", "p2"])}}, id="empty-peer-id"),
        pytest.param({"tensors": {PEERS_TENSOR: packed_peers(["p0", "p" * 10_000, "p2"])}}, id="overlong-peer-id"),
        pytest.param({"tensors": {PEERS_TENSOR: packed_peers(["p0", "p1", "p0"])}}, id="peer-twice"),
        pytest.param(
            {"tensors": {PEERS_TENSOR: packed_peers([]), COUNTS_TENSOR: torch.zeros(0, dtype=torch.float64)}},
            id="empty-table",
        ),
        pytest.param({"drop_tensors": [COUNTS_TENSOR]}, id="missing-counts"),
        pytest.param({"tensors": {COUNTS_TENSOR: torch.zeros(2, dtype=torch.float64)}}, id="too-few-counts"),
        pytest.param({"tensors": {COUNTS_TENSOR: torch.zeros(4, dtype=torch.float64)}}, id="too-many-counts"),
        pytest.param({"tensors": {COUNTS_TENSOR: torch.zeros(3, dtype=torch.float32)}}, id="counts-float32"),
        pytest.param({"tensors": {COUNTS_TENSOR: torch.zeros(3, 1, dtype=torch.float64)}}, id="counts-not-1d"),
        pytest.param(
            {"tensors": {COUNTS_TENSOR: torch.tensor([0.0, math.nan, 1.0], dtype=torch.float64)}}, id="nan-count"
        ),
        pytest.param(
            {"tensors": {COUNTS_TENSOR: torch.tensor([0.0, -math.inf, 1.0], dtype=torch.float64)}}, id="zero-count"
        ),
    ],
)
def test_a_malformed_token_message_is_refused_with_a_token_error(changes):
    with pytest.raises(TokenError):
        read(message(**changes))


def test_the_refusal_says_what_was_wrong():
    with pytest.raises(TokenError, match="token id 5 is not one of this run's 2 tokens"):
        read(message(meta={"token": 5}))
    with pytest.raises(TokenError, match="lists a peer twice"):
        read(message(tensors={PEERS_TENSOR: packed_peers(["p0", "p1", "p0"])}))


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(torch.zeros(4, dtype=torch.float64), id="wrong-shape"),
        pytest.param(torch.tensor([0.0, math.nan, 0.0], dtype=torch.float64), id="nan"),
        pytest.param(torch.tensor([0.0, math.inf, 0.0], dtype=torch.float64), id="infinite"),
        pytest.param(torch.zeros(3, dtype=torch.float32), id="wrong-dtype"),
    ],
)
def test_a_token_with_a_bad_model_is_an_invalid_state(model):
    with pytest.raises(InvalidState):
        read(message(tensors={"x": model}))


def test_a_token_with_a_missing_or_extra_model_tensor_is_an_invalid_state():
    with pytest.raises(InvalidState):
        read(message(drop_tensors=["x"]))
    with pytest.raises(InvalidState):
        read(message(tensors={"y": torch.zeros(3, dtype=torch.float64)}))
