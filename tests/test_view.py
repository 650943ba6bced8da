"""Views of the swarm, their wire form, and sampling by hash order with remembered failures."""

import asyncio

import msgpack
import pytest
import torch

from gossip.sampling import Liveness, hash_order
from gossip.view import VIEW_TENSOR, Entry, RoundAllowance, View, ViewError, decode_view
from tests.sim_swarm import run


def raw(rows) -> dict[str, torch.Tensor]:
    return {VIEW_TENSOR: torch.frombuffer(bytearray(msgpack.packb(rows)), dtype=torch.uint8)}


def test_merge_takes_the_later_activity_and_the_newer_membership():
    view = View("me", ["a", "b"])
    view.merge({"a": Entry(5, 0, False), "b": Entry(2, 1, True), "c": Entry(3)})
    view.merge({"a": Entry(4, 0, False), "b": Entry(9, 0, False)})  # older membership for b
    assert view.entries["a"] == Entry(5, 0, False)
    assert view.entries["b"] == Entry(9, 1, True)
    assert view.entries["c"] == Entry(3)
    assert view.estimate() == 9


def test_candidates_leave_out_peers_that_left_or_were_inactive_too_long():
    view = View("me", [])
    view.merge({"old": Entry(1), "recent": Entry(8), "gone": Entry(9, 1, True)})
    view.touch("me", 10)
    assert sorted(view.candidates(10, inactivity=5)) == ["me", "recent"]


def test_our_own_announcement_wins_over_earlier_ones():
    view = View("me", [])
    view.announce(left=True)
    other = View("x", [])
    other.merge({"me": Entry(0, 0, False)})
    other.merge(decode_view(view.encode(), max_round=10))
    assert other.left("me")


def test_a_view_survives_its_wire_form():
    view = View("me", ["a", "b"])
    view.touch("a", 7)
    view.announce(left=False)
    assert decode_view(view.encode(), max_round=7) == view.entries


@pytest.mark.parametrize(
    ("tensors", "reason"),
    [
        ({}, "no 'view'"),
        ({VIEW_TENSOR: torch.zeros(3)}, "no 'view'"),
        (raw({"a": 1}), "does not unpack"),
        (raw(7), "list of rows"),
        (raw([["a", 1, 0]]), "is not"),
        (raw([["a", "1", 0, False]]), "malformed field"),
        (raw([["a", True, 0, False]]), "malformed field"),
        (raw([["", 1, 0, False]]), "non-empty"),
        (raw([["a", 10**6, 0, False]]), "beyond"),
        (raw([["a", -1, 0, False]]), "beyond"),
        (raw([["a", 1, -1, False]]), "negative index"),
        (raw([["a", 1, 0, False], ["a", 2, 0, False]]), "twice"),
        (raw([["x" * 500, 1, 0, False]]), "does not unpack"),
        ({VIEW_TENSOR: torch.tensor([0xC1], dtype=torch.uint8)}, "does not unpack"),
    ],
)
def test_malformed_views_are_refused_with_the_reason(tensors, reason):
    with pytest.raises(ViewError, match=reason):
        decode_view(tensors, max_round=100)


def test_a_view_longer_than_the_bound_is_refused_before_it_is_built():
    rows = [[f"p{i}", 0, 0, False] for i in range(50)]
    with pytest.raises(ViewError, match="does not unpack"):
        decode_view(raw(rows), max_round=1, max_entries=10)


def test_a_view_does_not_grow_past_its_bound():
    view = View("me", [], max_entries=3)
    view.merge({f"p{i}": Entry(0) for i in range(10)})
    assert len(view.entries) == 3


def test_hash_order_is_the_same_for_everyone_and_changes_with_the_round():
    peers = [f"peer-{i}" for i in range(20)]
    assert hash_order(peers, 3) == hash_order(list(reversed(peers)), 3)
    assert hash_order(peers, 3) != hash_order(peers, 4)
    assert sorted(hash_order(peers, 3)) == sorted(peers)


def test_first_live_keeps_the_order_and_replaces_the_dead():
    dead = {"b", "d"}
    pinged = []

    async def ping(peer):
        pinged.append(peer)
        await asyncio.sleep(5 if peer in dead else 0.1)
        return peer not in dead

    liveness = Liveness(ping)
    order = ["a", "b", "c", "d", "e", "f"]
    assert run(liveness.first_live(order, 3, lambda peer: 0)) == ["a", "c", "e"]
    assert liveness.suspected("b") and liveness.suspected("d")
    pinged.clear()
    # Suspects are not pinged again.
    assert run(liveness.first_live(order, 3, lambda peer: 0)) == ["a", "c", "e"]
    assert "b" not in pinged and "d" not in pinged


def test_a_sign_of_life_clears_a_suspicion():
    liveness = Liveness(lambda peer: None)
    liveness.suspect("a", 4)
    liveness.seen_active("a", 4)
    assert liveness.suspected("a")
    liveness.seen_active("a", 5)
    assert not liveness.suspected("a")
    liveness.suspect("b", 1)
    liveness.heard_from("b")
    assert not liveness.suspected("b")


def test_first_live_returns_fewer_when_the_order_runs_out():
    async def ping(peer):
        return peer == "a"

    assert run(Liveness(ping).first_live(["x", "a", "y"], 2, lambda peer: 0)) == ["a"]


def test_a_heard_view_gives_the_senders_own_row_whole_and_only_the_activity_of_others():
    view = View("me", ["a", "b"])
    view.hear("a", {"a": Entry(4, 1, True), "b": Entry(6, 9, True), "me": Entry(8, 5, True)}, known=())
    assert view.entries["a"] == Entry(4, 1, True)
    assert view.entries["b"] == Entry(6, 0, False)  # nobody but b makes b leave
    assert view.entries["me"] == Entry(0)  # and nobody but us speaks for us


def test_a_heard_view_adds_only_peers_known_to_be_members():
    view = View("me", ["a"])
    view.hear("a", {"a": Entry(1), "member": Entry(2), "made-up": Entry(3)}, known={"member"})
    assert sorted(view.entries) == ["a", "me", "member"]


def test_a_peer_raises_its_own_index_by_two_at_most_per_message():
    view = View("me", ["a"])
    view.hear("a", {"a": Entry(0, 2**40, True)}, known=())
    assert view.entries["a"] == Entry(0, 2, True)
    view.hear("a", {"a": Entry(0, 3, False)}, known=())  # its next JOIN still wins
    assert view.entries["a"] == Entry(0, 3, False)


def test_the_allowance_lets_claims_jump_a_burst_then_follow_the_rate():
    allowance = RoundAllowance(burst=100, rate=10.0)
    assert allowance.ceiling(0, now=0.0) == 100
    allowance.spend(0, 100)
    assert allowance.ceiling(100, now=0.0) == 100  # spent: no further now
    assert allowance.ceiling(100, now=2.0) == 120  # 2 s at 10 rounds a second
    assert allowance.ceiling(100, now=1000.0) == 200  # never more than a burst ahead


def test_capping_brings_every_activity_back_to_the_bound():
    view = View("me", ["a"])
    view.merge({"a": Entry(50, 1, True)})
    view.touch("me", 70)
    view.cap(30)
    assert view.entries == {"a": Entry(30, 1, True), "me": Entry(30)}
