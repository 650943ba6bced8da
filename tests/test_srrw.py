"""SRRW on the simulated world: the walk, its self-repellence, meeting tokens, hostile messages and lost tokens.

Every peer's model is one number that starts at 1000 plus 100 times the peer's index, and
every visit adds 1 to the model the token carries, so the model a token ends with tells how many
visits it made and from which peer it started. (Models of similar size: the outlier guard would
rightly refuse a model hundreds of times the size of ours.)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import statistics

import pytest
import torch

from gossip.message import Message
from gossip.protocols.srrw import DONE, RECEIVED, REVOKE, STATUS, TOKEN, UNKNOWN, WalkSettings, start_peer
from gossip.token import COUNTS_TENSOR, PEERS_TENSOR, Token, token_message
from peer.sim import LinkModel, SimNetwork
from tests.sim_swarm import Walk, assert_walk_unaffected, run
from topology.walk import VisitCounts


class RecordingNetwork(SimNetwork):
    """Keeps every message sent, as (source, destination, message)."""

    def __init__(self, default_link: LinkModel | None = None):
        super().__init__(default_link or LinkModel(latency=0.01))
        self.sent: list[tuple[str, str, Message]] = []

    def transmit(self, src, dst, message, on_arrival):
        self.sent.append((src, dst, message))
        super().transmit(src, dst, message, on_arrival)


def walked(walk: Walk) -> Walk:
    run(walk.run())
    return walk


def spread(visits_per_peer: list[int]) -> int:
    return max(visits_per_peer) - min(visits_per_peer)


# --- one token --------------------------------------------------------------------------


def test_one_token_makes_every_hop_and_every_run_ends():
    rounds = 12
    walk = walked(Walk("ring", 5, rounds=rounds, seed=3))
    assert [round_ for _, round_ in walk.visits] == list(range(rounds))
    assert all(task.done() and not task.cancelled() for task in walk.tasks.values())
    assert all(protocol.finished() for protocol in walk.protocols.values())
    last = walk.holders()[-1]
    assert walk.live_copies() == [(last, 0, (0, rounds))]


def test_the_token_carries_the_model_and_every_visit_trains_it_once():
    rounds = 15
    walk = walked(Walk("ring", 5, rounds=rounds, seed=1))
    start = walk.start_value()
    assert walk.value(walk.holders()[-1]) == start + rounds
    # Every other peer keeps what it last trained: the token's model at its last visit there.
    for peer in walk.ids:
        hops = [round_ + 1 for holder, round_ in walk.visits if holder == peer]
        expected = start + hops[-1] if hops else walk.initial(peer)
        assert walk.value(peer) == expected, peer


def test_the_token_moves_along_the_graph():
    walk = walked(Walk("ring", 7, rounds=40, seed=2, alpha=5.0))
    path = [start_peer(walk.ids, 0, walk.seed), *walk.holders()]
    for here, there in itertools.pairwise(path):
        step = (walk.ids.index(there) - walk.ids.index(here)) % 7
        assert step in (1, 6), f"{here} -> {there} is not an edge of the ring"


def test_the_seed_decides_the_walk():
    def holders(seed):
        return walked(Walk("ring", 7, rounds=30, seed=seed)).holders()

    assert holders(4) == holders(4)
    assert holders(4) != holders(5)


def test_alpha_zero_is_the_base_walk_which_ignores_the_visit_counts():
    def holders(alpha, a):
        return walked(Walk("ring", 7, rounds=40, seed=6, alpha=alpha, gamma_exponent=a)).holders()

    # The step sizes a change the visit counts; only a walk that reads them can tell.
    assert holders(0.0, 0.6) == holders(0.0, 1.0)
    assert holders(5.0, 0.6) != holders(5.0, 1.0)


def test_alpha_zero_turns_back_about_half_the_time_on_a_ring():
    def turns_back(alpha):
        walk = walked(Walk("ring", 9, rounds=200, seed=0, alpha=alpha))
        path = [start_peer(walk.ids, 0, walk.seed), *walk.holders()]
        return sum(path[k] == path[k - 2] for k in range(2, len(path))) / (len(path) - 2)

    # The simple random walk goes back with probability 1/2 (199 moves: 0.35..0.65 is over 4 sigmas).
    assert 0.35 < turns_back(0.0) < 0.65
    # A strongly repelled walk goes back to the peer it just left only at the end of a sweep.
    assert turns_back(20.0) < 0.2


def test_self_repellence_evens_out_the_visits():
    n, rounds = 9, 90

    def spreads(alpha):
        result = []
        for seed in range(4):
            walk = walked(Walk("ring", n, rounds=rounds, seed=seed, alpha=alpha, gamma_exponent=1.0))
            result.append(spread([walk.holders().count(peer) for peer in walk.ids]))
        return result

    plain, repelled = spreads(0.0), spreads(20.0)
    # 10 visits per peer on average: the simple walk leaves some peers far behind, the repelled one does not.
    assert max(repelled) <= 3, repelled
    assert statistics.mean(repelled) * 3 < statistics.mean(plain), (repelled, plain)


# --- several tokens ---------------------------------------------------------------------


def test_two_tokens_both_make_every_hop_and_every_run_ends():
    rounds = 20
    walk = walked(Walk("ring", 7, rounds=rounds, seed=0, tokens=2))
    assert all(task.done() and not task.cancelled() for task in walk.tasks.values())
    assert sorted(round_ for _, round_ in walk.visits) == sorted(list(range(rounds)) * 2)
    copies = walk.live_copies()
    assert sorted(token_id for _, token_id, _ in copies) == [0, 1]
    assert all(key == (0, rounds) for _, _, key in copies)


def test_tokens_at_one_peer_at_once_average_their_models():
    ids = ["p0", "p1", "p2"]
    seed = next(s for s in range(100) if start_peer(ids, 0, s) != start_peer(ids, 1, s))
    walk = Walk("ring", 3, rounds=1, seed=seed, tokens=2)
    first, second = start_peer(ids, 0, seed), start_peer(ids, 1, seed)
    (meeting,) = set(ids) - {first, second}
    # Each start peer sees the other as gone, so both tokens make their one hop to the third peer.
    walk.neighbourhoods[first].departed(second)
    walk.neighbourhoods[second].departed(first)
    run(walk.run())
    assert walk.holders() == [meeting, meeting]
    mean = (walk.start_value(0) + walk.start_value(1)) / 2
    # The first to train averages both models and adds its step (mean + 1); the second then
    # averages with the first's trained model (mean + 1/2) and adds its own. Without averaging
    # the meeting peer would end with a start value + 1.
    assert walk.value(meeting) == mean + 1.5
    assert walk.value(first) == walk.start_value(0) and walk.value(second) == walk.start_value(1)
    assert sorted(token_id for _, token_id, _ in walk.live_copies()) == [0, 1]


# --- hostile messages -------------------------------------------------------------------


def forged(token_id=0, generation=0, hop=1, *, model=None, log_counts=None):
    """A token message from a stranger, for the peers p0..p4; ``log_counts`` goes on the wire unchecked."""
    model = model if model is not None else torch.zeros(1, dtype=torch.float64)
    counts = VisitCounts.uniform(f"p{i}" for i in range(5))
    message = token_message(TOKEN, "mallory", Token(token_id, generation, hop, {"x": model}, counts))
    if log_counts is not None:
        message.tensors[COUNTS_TENSOR] = torch.tensor(log_counts, dtype=torch.float64)
    return message


def test_malformed_tokens_are_refused_counted_and_leave_the_walk_alone():
    walk = Walk("ring", 5, rounds=12, seed=0)
    attacker = walk.network.attach("mallory")
    broken_table = forged()
    broken_table.tensors[PEERS_TENSOR] = torch.tensor([0xC1], dtype=torch.uint8)  # not msgpack
    bad = [
        forged(token_id=1),  # this run has one token
        broken_table,
        forged(log_counts=[0.0, math.nan, 0.0, 0.0, 0.0]),
        forged(hop=walk.rounds + 1),
    ]

    async def refused(message):
        with pytest.raises(TimeoutError):  # a refused token gets no answer
            await attacker.request("p2", message, timeout=0.5)

    async def attack():
        await asyncio.sleep(0.05)  # while the token walks
        await asyncio.gather(*(refused(message) for message in bad))

    run(walk.run(attack()))
    assert walk.rejections("p2") == {"malformed": len(bad)}
    assert_walk_unaffected(walk)


def test_a_member_s_token_with_an_absurd_model_or_an_unreachable_generation_is_refused():
    walk = Walk("ring", 5, rounds=12, seed=0)
    attacker = walk.network.attach("mallory")  # a member of the simulated world: admitted, and lying
    absurd = forged(generation=1, model=torch.full((1,), 1e30, dtype=torch.float64))
    exhausting = forged(generation=2**62 - 1, model=torch.full((1,), 1200.0, dtype=torch.float64))

    async def refused(message):
        with pytest.raises(TimeoutError):  # a refused token gets no answer
            await attacker.request("p2", message, timeout=0.5)

    async def attack():
        await asyncio.sleep(0.05)  # while the token walks
        await asyncio.gather(refused(absurd), refused(exhausting))

    run(walk.run(attack()))
    assert walk.rejections("p2") == {"outlier": 1, "implausible": 1}
    assert_walk_unaffected(walk)


def word(kind, token_id=0, generation=0, hop=0):
    return Message(kind, "mallory", hop, meta={"token": token_id, "generation": generation})


def test_a_revoke_from_a_member_that_never_handed_over_the_token_cannot_stop_the_walk():
    walk = Walk("ring", 5, rounds=12, seed=0)
    attacker = walk.network.attach("mallory")

    async def attack():
        await asyncio.sleep(0.05)
        await asyncio.gather(*(attacker.send(peer, word(REVOKE, generation=2**62 - 1, hop=1)) for peer in walk.ids))

    run(walk.run(attack()))
    assert all(walk.rejections(peer) == {"implausible": 1} for peer in walk.ids)
    assert_walk_unaffected(walk)


def test_one_member_s_word_that_a_token_is_done_ends_no_run():
    walk = Walk("ring", 5, rounds=12, seed=0)
    attacker = walk.network.attach("mallory")

    async def attack():
        await asyncio.sleep(0.05)
        await asyncio.gather(*(attacker.send(peer, word(DONE, hop=walk.rounds)) for peer in walk.ids))
        await asyncio.gather(*(attacker.send(peer, word(DONE, hop=3)) for peer in walk.ids))  # not the last hop

    run(walk.run(attack()))
    assert all(walk.rejections(peer) == {"implausible": 1} for peer in walk.ids)
    assert_walk_unaffected(walk)
    assert all(protocol.finished() for protocol in walk.protocols.values())


def test_word_that_a_token_is_done_counts_from_the_peer_it_went_to_or_from_two_peers():
    walk = Walk("ring", 5, rounds=12, seed=0)
    off_path, on_path = walk.protocols["p0"], walk.protocols["p2"]
    off_path._successor[0] = "p1"
    on_path._successor[0] = "p3"

    async def hear():
        off_path._done_word(0, 0, "p3")
        assert not off_path.finished()  # one peer off the token's path: not yet
        off_path._done_word(0, 0, "p3")
        assert not off_path.finished()  # the same peer again
        off_path._done_word(0, 0, "p4")
        on_path._done_word(0, 0, "p3")

    run(hear())
    assert off_path.finished() and on_path.finished()


def test_a_token_with_a_model_of_the_wrong_shape_is_counted_as_an_invalid_model():
    walk = Walk("ring", 5, rounds=12, seed=0)
    attacker = walk.network.attach("mallory")

    async def attack():
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            await attacker.request("p2", forged(model=torch.zeros(2, dtype=torch.float64)), timeout=0.5)

    run(walk.run(attack()))
    assert walk.rejections("p2") == {"invalid-model": 1}
    assert_walk_unaffected(walk)


def test_a_replayed_token_is_refused_as_stale():
    network = RecordingNetwork()
    walk = Walk("ring", 5, rounds=16, seed=0, network=network)
    attacker = network.attach("mallory")
    halfway = asyncio.Event()
    replayed = []

    def mark_halfway(peer, round_):
        if round_ == 8:
            halfway.set()

    async def replay_hop_3():
        await halfway.wait()
        ((receiver, message),) = [(dst, m) for _, dst, m in network.sent if m.kind == TOKEN and m.round == 3]
        replayed.append((receiver, await attacker.request(receiver, message, timeout=0.5)))

    walk.on_visit = mark_halfway
    run(walk.run(replay_hop_3()))
    ((receiver, reply),) = replayed
    assert reply.kind == RECEIVED and reply.meta["taken"] is False
    assert walk.rejections(receiver) == {"stale-token": 1}
    assert_walk_unaffected(walk)


def test_a_token_whose_counts_overflow_the_kernel_is_refused_or_walks_on():
    # Any peer may carry a walk on, so a stranger's token of a newer generation is taken; but counts
    # so far apart that alpha times them overflows must not strand the token at its holder.
    network = RecordingNetwork()
    walk = Walk("ring", 5, rounds=12, seed=0, network=network)
    attacker = network.attach("mallory")
    generation = 5  # above any the run re-issues on its own: a TOKEN of it from p2 is the stranger's, moving on

    async def attack():
        await asyncio.sleep(0.05)
        with contextlib.suppress(TimeoutError):  # refused: no answer
            await attacker.request("p2", forged(generation=generation, log_counts=[-1e308] * 5), timeout=0.5)

    run(walk.run(attack()))
    handed_on = any(
        src == "p2" and m.kind == TOKEN and m.meta["generation"] == generation for src, _, m in network.sent
    )
    assert handed_on or walk.rejections("p2")["malformed"] == 1
    assert all(protocol.finished() for protocol in walk.protocols.values())
    assert len(walk.live_copies()) == 1


# --- lost tokens --------------------------------------------------------------------------


def test_the_custodian_reissues_a_token_lost_with_its_holder():
    rounds, crash_at = 20, 6
    walk = Walk("ring", 5, rounds=rounds, seed=0)
    victims = []

    def crash_holder(peer, round_):
        if round_ == crash_at and not victims:
            victims.append(peer)
            walk.crash(peer)

    walk.on_visit = crash_holder
    run(walk.run())
    (victim,) = victims
    assert victim not in walk.live()
    assert all(walk.tasks[peer].done() and not walk.tasks[peer].cancelled() for peer in walk.live())
    assert sum(walk.protocols[peer].reissued for peer in walk.live()) >= 1
    # The lost visit is made again from the custodian's copy, which has not trained on it.
    rounds_made = [round_ for _, round_ in walk.visits]
    assert rounds_made == [*range(crash_at + 1), *range(crash_at, rounds)]
    last = walk.holders()[-1]
    assert walk.value(last) == walk.start_value() + rounds
    # Re-issued at least once (a later holder that tries the dead peer re-issues again).
    ((holder, token_id, (generation, hop)),) = walk.live_copies()
    assert (holder, token_id, hop) == (last, 0, rounds) and generation >= 1


def test_a_holder_that_restarts_answers_unknown_and_the_token_is_reissued():
    network = RecordingNetwork()
    rounds, crash_at = 20, 6
    walk = Walk("ring", 5, rounds=rounds, seed=0, network=network, patience=2.0)
    victims = []

    def crash_holder(peer, round_):
        if round_ == crash_at and not victims:
            victims.append(peer)
            walk.crash(peer)
            asyncio.get_running_loop().call_later(0.5, walk.restart, peer)  # before its custodian asks

    walk.on_visit = crash_holder
    run(walk.run())
    (victim,) = victims
    assert victim in walk.live()
    answers = [m.meta["status"] for src, _, m in network.sent if src == victim and m.kind == STATUS]
    assert answers == [UNKNOWN]  # it never saw the token its custodian asks after
    assert sum(walk.protocols[peer].reissued for peer in walk.live()) >= 1
    assert all(walk.tasks[peer].done() and not walk.tasks[peer].cancelled() for peer in walk.ids)
    assert all(walk.protocols[peer].finished() for peer in walk.ids)
    last = walk.holders()[-1]
    assert walk.value(last) == walk.start_value() + rounds
    assert len(walk.live_copies()) == 1


class SlowFirstHandOver(SimNetwork):
    """The link that carries the first token is slow for ``lasts`` seconds, for whatever else goes that way too
    (the way back, which carries the acknowledgement, is not)."""

    def __init__(self, *, latency, lasts):
        super().__init__(LinkModel(latency=0.01))
        self.latency, self.lasts = latency, lasts
        self.slowed: tuple[str, str] | None = None

    def transmit(self, src, dst, message, on_arrival):
        if message.kind == TOKEN and self.slowed is None:
            self.slowed = (src, dst)
            self.set_link(src, dst, LinkModel(latency=self.latency))
            asyncio.get_running_loop().call_later(self.lasts, self.set_link, src, dst, self.default_link)
        super().transmit(src, dst, message, on_arrival)


@pytest.mark.parametrize(
    "slow_for",
    [
        pytest.param(1.1, id="slow-for-the-token-and-its-revocation"),
        pytest.param(3.0, id="slow-for-the-acknowledgements-that-follow"),
    ],
)
def test_a_false_alarm_leaves_one_live_copy(slow_for):
    # The first token takes 1.5 s to arrive, past the 1 s timeout; training takes 0.5 s a visit,
    # so the re-issued walk is still young when the slow copy arrives and is taken.
    network = SlowFirstHandOver(latency=1.5, lasts=slow_for)
    walk = Walk("ring", 5, rounds=30, seed=0, network=network, timeout=1.0, seconds_per_step=0.5)
    run(walk.run())
    sender, slow_receiver = network.slowed
    assert walk.protocols[sender].reissued >= 1
    first_visits = [peer for peer, round_ in walk.visits if round_ == 0]
    assert slow_receiver in first_visits and len(first_visits) == 2  # the slow copy and the re-issued one
    # The slow copy was dropped once word of the newer generation reached it.
    assert sum(protocol.stale_dropped for protocol in walk.protocols.values()) >= 1
    assert all(walk.tasks[peer].done() and not walk.tasks[peer].cancelled() for peer in walk.ids)
    assert len(walk.live_copies()) == 1
    assert max(round_ for _, round_ in walk.visits) == walk.rounds - 1


# --- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {"alpha": -0.1},
        {"alpha": math.nan},
        {"gamma_exponent": 0.5},
        {"gamma_exponent": 1.01},
        {"beta_exponent": 0.5},
        {"beta_exponent": 1.5},
        {"tokens": 0},
        {"stay": -0.1},
        {"stay": 1.0},
        {"patience": 0.0},
        {"patience": -1.0},
    ],
)
def test_walk_settings_refuse_values_outside_their_range(settings):
    with pytest.raises(ValueError):
        WalkSettings(**settings)


def test_walk_settings_accept_the_edges_of_their_ranges():
    WalkSettings(alpha=0.0, gamma_exponent=1.0, beta_exponent=1.0, tokens=1, stay=0.0, patience=0.01)
