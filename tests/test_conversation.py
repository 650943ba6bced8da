"""A protocol's conversation on the simulated network: deadlines, refusals, and tasks that end with the run."""

import asyncio
import inspect
import logging

import pytest

from gossip.conversation import Conversation
from gossip.message import Message
from peer.sim import LinkModel, SimClock, SimNetwork, SimTransport, VirtualTimeLoop

TIMEOUT = 5.0


def run(coroutine):
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coroutine)


def two_peers(link=None):
    """Peers a and b, b recording what it receives; a's conversation and b's record."""
    network = SimNetwork(link or LinkModel(latency=0.25))
    a, b = network.attach("a"), network.attach("b")
    received = []

    async def record(message):
        received.append(message)

    async def echo(message):
        return Message("answer", "b", message.round + 1)

    b.serve("note", record)
    b.serve("question", echo)
    return Conversation(a, SimClock(), timeout=TIMEOUT), network, received


class StuckTransport(SimTransport):
    """A transport whose sends never complete, as to a peer that stopped reading."""

    async def send(self, peer, message):
        await asyncio.Event().wait()


def test_a_message_sent_reaches_the_peer_and_the_send_says_so():
    talk, _, received = two_peers()

    async def main():
        sent = await talk.send("b", Message("note", "a", 3))
        await asyncio.sleep(1)
        return sent

    assert run(main()) is True
    assert [(m.kind, m.sender, m.round) for m in received] == [("note", "a", 3)]


def test_a_send_to_an_unknown_peer_returns_false_and_logs_why_at_info(caplog):
    talk, _, _ = two_peers()
    caplog.set_level(logging.INFO, logger="gossip.conversation")
    assert run(talk.send("nobody", Message("note", "a", 0))) is False
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "a: could not send a note to nobody: PeerUnreachable(\"'nobody' is not a peer of this network\")")
    ]


def test_a_send_that_does_not_complete_gives_up_after_the_timeout_in_virtual_time():
    network = SimNetwork()
    network.attach("b")
    talk = Conversation(StuckTransport(network, "a"), SimClock(), timeout=TIMEOUT)

    async def main():
        sent = await talk.send("b", Message("note", "a", 0))
        return sent, asyncio.get_running_loop().time()

    assert run(main()) == (False, TIMEOUT)


def test_a_question_gets_the_peers_answer():
    talk, _, _ = two_peers()
    answer = run(talk.ask("b", Message("question", "a", 6)))
    assert (answer.kind, answer.sender, answer.round) == ("answer", "b", 7)


def test_a_question_nobody_answers_returns_none_after_the_timeout_and_logs_nothing(caplog):
    talk, _, _ = two_peers(LinkModel(loss=1.0))
    caplog.set_level(logging.DEBUG, logger="gossip.conversation")

    async def main():
        answer = await talk.ask("b", Message("question", "a", 0))
        return answer, asyncio.get_running_loop().time()

    assert run(main()) == (None, TIMEOUT)
    assert caplog.records == []


def test_a_question_may_have_its_own_timeout_and_says_what_went_unanswered(caplog):
    talk, _, _ = two_peers(LinkModel(loss=1.0))
    caplog.set_level(logging.INFO, logger="gossip.conversation")

    async def main():
        answer = await talk.ask("b", Message("question", "a", 0), timeout=1.5, unanswered="b kept quiet")
        return answer, asyncio.get_running_loop().time()

    assert run(main()) == (None, 1.5)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.INFO, "a: b kept quiet: TimeoutError()")]


def test_a_question_to_an_unknown_peer_returns_none_at_once():
    talk, _, _ = two_peers()

    async def main():
        answer = await talk.ask("nobody", Message("question", "a", 0))
        return answer, asyncio.get_running_loop().time()

    assert run(main()) == (None, 0.0)


def test_a_refused_message_is_counted_under_its_reason_and_logged_with_its_sender_and_detail(caplog):
    talk, _, _ = two_peers()
    caplog.set_level(logging.DEBUG, logger="gossip.conversation")
    talk.refuse(Message("model", "b", 4), "invalid-model", "a tensor is missing")
    assert talk.transport.counters.rejections == {"invalid-model": 1}
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "a: refused a model from b (invalid-model): a tensor is missing")
    ]


def test_a_refusal_may_name_only_the_sender_and_be_logged_at_another_level(caplog):
    talk, _, _ = two_peers()
    caplog.set_level(logging.DEBUG, logger="gossip.conversation")
    assert talk.refuse("b", "stale-token", "an old copy", level=logging.INFO) is None
    talk.refuse("b", "stale-token", "an older copy", level=logging.INFO)
    assert talk.transport.counters.rejections == {"stale-token": 2}
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "a: refused a message from b (stale-token): an old copy"),
        (logging.INFO, "a: refused a message from b (stale-token): an older copy"),
    ]


def test_lines_go_to_the_logger_the_protocol_names(caplog):
    network = SimNetwork()
    talk = Conversation(network.attach("a"), SimClock(), timeout=TIMEOUT, logger=logging.getLogger("some.protocol"))
    caplog.set_level(logging.WARNING)
    talk.refuse("b", "malformed", "garbled")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("some.protocol", "a: refused a message from b (malformed): garbled")
    ]


def test_a_reason_outside_the_fixed_set_is_not_counted():
    talk, _, _ = two_peers()
    with pytest.raises(ValueError, match="unknown rejection reason 'rude'"):
        talk.refuse("b", "rude", "it said so")
    assert talk.transport.counters.rejected == 0


def test_closing_cancels_the_background_tasks_and_waits_until_they_have_ended():
    talk, _, _ = two_peers()
    ended = []

    async def forever(name):
        try:
            await asyncio.sleep(3600)
        finally:
            ended.append(name)

    async def main():
        tasks = [talk.spawn(forever("first")), talk.spawn(forever("second"))]
        await asyncio.sleep(1)
        await talk.aclose()
        return tasks, asyncio.get_running_loop().time()

    tasks, now = run(main())
    assert ended == ["first", "second"]
    assert [task.cancelled() for task in tasks] == [True, True]
    assert now == 1.0


def test_a_task_that_finished_is_no_longer_held():
    talk, _, _ = two_peers()

    async def main():
        task = talk.spawn(asyncio.sleep(1, result="slept"))
        await asyncio.sleep(2)
        held = len(talk._tasks)
        await talk.aclose()
        return task.result(), held

    assert run(main()) == ("slept", 0)


def test_once_closed_nothing_more_is_started_and_the_coroutine_is_closed_unrun():
    talk, _, received = two_peers()
    started = []

    async def work():
        started.append(True)

    async def main():
        await talk.aclose()
        coroutine = work()
        task = talk.spawn(coroutine)
        talk.tell("b", Message("note", "a", 0))
        await asyncio.sleep(1)
        return task, inspect.getcoroutinestate(coroutine)

    assert run(main()) == (None, inspect.CORO_CLOSED)
    assert talk.closed is True
    assert started == []
    assert received == []


def test_draining_waits_for_what_was_told_and_not_for_other_tasks():
    talk, _, _ = two_peers()

    async def main():
        other = talk.spawn(asyncio.sleep(3600))
        talk.tell("b", Message("note", "a", 1))
        talk.tell("b", Message("note", "a", 2))
        await talk.drain()
        drained_at = asyncio.get_running_loop().time()
        await talk.aclose()
        return drained_at, other.cancelled()

    assert run(main()) == (0.0, True)  # handing a message to the simulated network takes no time
    assert talk._words == {}


def test_draining_waits_for_a_told_message_as_long_as_its_timeout():
    network = SimNetwork()
    network.attach("b")
    talk = Conversation(StuckTransport(network, "a"), SimClock(), timeout=TIMEOUT)

    async def main():
        talk.tell("b", Message("note", "a", 0))
        await talk.drain()
        return asyncio.get_running_loop().time()

    assert run(main()) == TIMEOUT


def test_a_task_may_close_its_own_conversation_without_waiting_for_itself():
    talk, _, _ = two_peers()

    async def main():
        task = talk.spawn(talk.aclose())
        async with asyncio.timeout(1):
            await task
        return talk.closed

    assert run(main()) is True
