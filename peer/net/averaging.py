"""Averaging in groups between real peers (``gossip.averaging.GroupAveraging``), through hivemind's
decentralized averaging: peers that average the same round at about the same time are matched into
a group through the DHT (under a key of the round's own) and all-reduce their tensors.

Why hivemind: its matchmaking and butterfly all-reduce are tested and tolerate peers that fail;
we write no all-reduce of our own.

Limits:

- A private swarm's key guards our streams (``peer.net.transport``), not hivemind's averaging
  RPCs: anyone who can name the group's key may join a group. So every member of a group is
  checked against the swarm's admission once the all-reduce is over, and a round with a stranger
  in it (or a member of another round, or a non-finite mean) is thrown away: the peer goes on
  with its own tensors. The group's key is a digest of the swarm's records key (secret in a
  private swarm) and of the peers' fingerprint, so that strangers and incompatible peers rarely
  get that far.
- A member that fails while the group all-reduces leaves some parts of the tensors averaged and
  others not (hivemind goes on without it); such a round is refused by every member of the group
  (``_Averager``). A member that fails before the group is assembled is simply not in it.
- The all-reduce carries floating-point tensors as float32 (or float16, ``Float16Compression``).
  Its traffic is counted in the transport's counters as a butterfly all-reduce moves it: each of
  k members sends (k - 1) / k of its tensors to be reduced and receives as much of the mean, so
  2 (k - 1) / k of them each way, header bytes aside.
- A round given up at the caller's deadline may still all-reduce in the averager's process; the
  next round of the same tensors waits for it (up to the all-reduce timeout).
- hivemind's averager is a process of its own, forked from the peer: it ignores Ctrl-C (the peer
  stops it), and the peer's reaper (``peer.net.reaper``) kills it with the peer's other
  descendants when the peer is killed outright.
- A state averaged may hold some of the reference's tensors only (a fragment of the model, as
  outer-optimizer training averages in turn). hivemind's averager holds tensors of a fixed
  layout, so there is one per layout (the set of names averaged), matching its groups under a
  prefix of its own: peers averaging different fragments are never grouped. Each is started on
  its layout's first round and that round waits for it within its own timeout: its group forms
  that much later on every peer, so peers that reach the round together still meet. Measured: 20
  to 40 ms for small tensors; 0.1 s for a fragment of 64 MB in a peer holding 1 GiB, most of it on
  the event loop (the averager's tensors in shared memory, the fork; only the main thread may
  fork it, for Ctrl-C's sake), the rest waiting for it to attach to the DHT's daemon. One that
  fails to start (or dies) leaves its layout's rounds to fail, each with a warning: the peer goes
  on with its own tensors. All run until ``close``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException
from hivemind.averaging.control import StepControl
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.compression import CompressionBase, Float16Compression, NoCompression
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from gossip.averaging import Averaged, GroupAveraging
from gossip.learner import State
from gossip.transport import Admission, TrafficCounters
from peer.errors import ConfigError
from peer.net.membership import children_ignore_ctrl_c

log = logging.getLogger(__name__)

T = TypeVar("T")

# A group is assembled this long after its first member asks, from whoever asked by then: peers
# that reach a round within this of each other average together. (hivemind's default.)
MATCHMAKING_SECONDS = 5.0
# How long a peer waits for a would-be leader's answer (at most half the matchmaking time). Below
# the matchmaking time, as hivemind asks: its matchmaking can deadlock (A asks B while B asks A),
# and this timeout breaks it.
REQUEST_SECONDS = 3.0
# A member that sends no next chunk of its tensors (512 KiB) within this is dropped from the
# all-reduce; a reducer that returns no next averaged chunk within twice this (hivemind's ratio: a
# reducer waits for its slowest sender) is too. Generous for a slow link, short next to a round.
CHUNK_SECONDS = 5.0
# The longest an all-reduce may run in the averager's process once its group is assembled. One
# given up by its caller runs on until then (the next step waits for it), so no longer than a call
# may wait: as --exchange-timeout's default. (A member gone mid-way can leave hivemind waiting on
# its stream for long.)
ALLREDUCE_SECONDS = 30.0
STARTUP_SECONDS = 30.0  # for the averager's process to attach to the DHT's daemon
# What the all-reduce may carry, by --codec: hivemind's own compressions (its 8-bit ones break
# with numpy>=2.4, and a gossip codec's payloads are not summable).
COMPRESSIONS: Mapping[str, Callable[[], CompressionBase]] = {"none": NoCompression, "fp16": Float16Compression}
CLOSING = "the averager is closing"  # why a step under way when it closes fails
# hivemind logs a step that failed as an error, with its traceback. A step that found no group is
# a round that a peer goes through alone (the first of a swarm, a late one), and one that ends as
# the averager closes is no error either: ``average`` reports both, at info.
QUIET_FAILURES = ("could not find a group", CLOSING)
logging.getLogger("hivemind.averaging.averager").addFilter(
    lambda record: not any(failure in record.getMessage() for failure in QUIET_FAILURES)
)


def all_reduce_compression(codec: str) -> CompressionBase:
    """hivemind's compression for a --codec spec; ConfigError for a codec the all-reduce cannot carry."""
    if codec not in COMPRESSIONS:
        raise ConfigError(
            f"--codec {codec}: the all-reduce between real peers carries float32 or float16 (hivemind's own); "
            "use --codec fp16 or none there, or a gossip outer mix for other codecs"
        )
    return COMPRESSIONS[codec]()


def group_prefix(*parts: str) -> str:
    """hivemind's key for the averaging groups of the peers that ``parts`` set apart (a swarm's
    records key, their fingerprint): a digest, since hivemind's prefix may hold no dot (a swarm's
    name may) and a private swarm's must not follow from its name."""
    return "outer_" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


class _Averager(DecentralizedAverager):
    """hivemind's averager, but an all-reduce that went on without a failed member is an error,
    and it shuts down only once its matchmaking has stopped.

    hivemind goes on without a failed member by keeping that member's parts as they were and
    averaging the others without its later chunks: a mean of no group. As an error, the step fails
    and every member refuses the round (without retrying: the tensors are half averaged in place).

    Matchmaking makes requests to the DHT's process, which dies (EOFError) when it reads a request
    whose sender has exited (a request carries a pipe that the reader fetches from its sender).
    """

    # hivemind caches the RPC handlers and the stub per class, and names the handlers after the
    # class: a subclass must not inherit its parent's cache, or it would call the parent's names.
    _rpc_handlers = None
    _stub_type = None

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        await super()._run_allreduce_inplace_(tensors, group_info, group_id, **kwargs)
        runner = self._running_groups[group_id or group_info.group_id].result()
        not_averaged = runner.tensor_part_container.failed_size
        if runner.banned_senders or not_averaged:
            raise AllreduceException(
                f"{len(runner.banned_senders)} member(s) stopped sending and {not_averaged} values were not averaged"
            )

    async def _shutdown(self, timeout: float) -> None:
        matchmaking = self._matchmaking
        if matchmaking.is_looking_for_group and not matchmaking.assembled_group.done():
            # Its step ends as one that found no group: matchmaking withdraws from the DHT, and the
            # step fails. (hivemind's own cancel of a step fails across processes.) An all-reduce
            # under way makes no requests; hivemind cancels it below.
            matchmaking.assembled_group.set_exception(MatchmakingException(CLOSING))
        try:
            await asyncio.wait_for(self._matchmaking_stopped(), timeout / 2)  # the rest is for the process to exit
        except TimeoutError:
            log.warning("hivemind's matchmaking did not stop in %.1f s; the DHT may not outlive it", timeout / 2)
        try:
            await super()._shutdown(timeout)
        except OSError:
            # The p2p daemon went first (Ctrl-C reaches the whole process group): its handlers with it.
            log.debug("the averager's p2p daemon has gone before it")

    async def _matchmaking_stopped(self) -> None:
        async with self._matchmaking.lock_looking_for_group:  # held until its requests are answered
            pass


class HivemindAveraging(GroupAveraging):
    """Averages a state, or a fragment of it, with the peers of the same group prefix, through
    hivemind's all-reduce: one averager per layout averaged (``_Layout``), each matching its groups
    under a prefix of its own."""

    def __init__(
        self, dht: hivemind.DHT, prefix: str, reference: State, admission: Admission, *, client_mode: bool = False,
        compression: CompressionBase | None = None, counters: TrafficCounters | None = None,
        matchmaking_time: float = MATCHMAKING_SECONDS, chunk_timeout: float = CHUNK_SECONDS,
        allreduce_timeout: float = ALLREDUCE_SECONDS,
    ):
        """Averaging on the running ``dht``. ``reference`` fixes the names, shapes and dtypes of the
        tensors averaged: a state averaged holds all of them or some (a fragment of the model);
        ``admission`` says whether a group's member is of this swarm; a peer in ``client_mode``
        accepts no connections (it joins groups that others lead); ``counters``, where given, count
        the traffic and the rounds refused. No averager starts here: each layout's starts on its
        first round."""
        if not reference:
            raise ValueError("nothing to average: the reference state is empty")
        if integers := sorted(name for name, tensor in reference.items() if not tensor.is_floating_point()):
            raise ValueError(f"the all-reduce averages floating-point tensors only, not {', '.join(integers)}")
        self.layout = {name: (tensor.shape, tensor.dtype) for name, tensor in reference.items()}
        self.prefix, self.admission, self.counters = prefix, admission, counters
        self.me = dht.peer_id.to_base58()
        self.width = 2 if isinstance(compression, Float16Compression) else 4  # bytes of a value on the wire
        self.matchmaking_time = matchmaking_time
        self._averager = functools.partial(  # of a layout's tensors, under a prefix
            _Averager, dht=dht, start=False, target_group_size=None, min_matchmaking_time=matchmaking_time,
            request_timeout=min(REQUEST_SECONDS, matchmaking_time / 2), allreduce_timeout=allreduce_timeout,
            sender_timeout=chunk_timeout, reducer_timeout=2 * chunk_timeout,
            compression=compression or NoCompression(), client_mode=client_mode,
            allow_state_sharing=False,  # it would serve our tensors to anyone who asks
        )
        self._layouts: dict[tuple[str, ...], _Layout] = {}
        self._closed = False

    async def average(self, round_: int, state: State, timeout: float) -> Averaged | None:
        names = self._check(state)
        if self._closed:
            log.warning("averaging round %d: the averaging is closed", round_)
            return None
        layout = self._layouts.get(names) or self._start(names)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                if not await layout.running():
                    log.warning("averaging round %d: hivemind's averager is not running", round_)
                    return None
                gathered = await layout.step(round_, state, deadline - loop.time())
                if gathered is None:
                    return None
                averaged = await _in_daemon_thread(layout.read)
                refusal = await self._refusal(round_, gathered, averaged)
        except TimeoutError:
            log.info("averaging round %d: no group averaged within %.1f s", round_, timeout)
            return None
        if refusal:
            self._refuse(round_, *refusal)
            return None
        self._count(layout, len(gathered))
        return Averaged(
            state={
                name: tensor.to(device=state[name].device, dtype=self.layout[name][1])
                for name, tensor in zip(names, averaged)
            },
            group=frozenset(peer.to_base58() for peer in gathered),
        )

    def _check(self, state: State) -> tuple[str, ...]:
        """The names of ``state``'s tensors, in the same order on every peer; ValueError, before
        anything is sent, when they are not some of the reference's, laid out as there."""
        if not state:
            raise ValueError("nothing to average: the state is empty")
        if unknown := sorted(state.keys() - self.layout.keys()):
            raise ValueError(f"{', '.join(unknown)}: not in the reference state")
        for name, tensor in state.items():
            shape, dtype = self.layout[name]
            if tensor.shape != shape or tensor.dtype != dtype:
                raise ValueError(f"{name}: {tuple(tensor.shape)} {tensor.dtype}, averaged as {tuple(shape)} {dtype}")
        return tuple(sorted(state))

    def _start(self, names: tuple[str, ...]) -> _Layout:
        tensors = [torch.zeros(self.layout[name][0], dtype=torch.float32) for name in names]
        averager = self._averager(tensors, prefix=layout_prefix(self.prefix, names))
        self._layouts[names] = layout = _Layout(names, averager, self.matchmaking_time)
        return layout

    async def _refusal(
        self, round_: int, gathered: dict[PeerID, Any], averaged: list[torch.Tensor]
    ) -> tuple[str, str] | None:
        """Why the group's mean is refused (a rejection reason, a detail), if it is: a member that
        is not of this swarm, or that averaged another round (a stranger may name any), or a mean
        that is not finite."""
        others = [peer.to_base58() for peer in gathered if peer.to_base58() != self.me]
        # A member whose admission could not be checked (a failed reading of the records) is not admitted.
        admitted = await asyncio.gather(*(self.admission(peer) for peer in others), return_exceptions=True)
        strangers = [peer for peer, member in zip(others, admitted) if member is not True]
        if strangers:
            return "not-member", f"not admitted: {', '.join(strangers)}"
        elsewhere = {
            peer.to_base58(): value for peer, value in gathered.items() if type(value) is not int or value != round_
        }
        if elsewhere:
            return "implausible", f"members of other rounds: {elsewhere}"
        if not all(torch.isfinite(tensor).all() for tensor in averaged):
            return "invalid-model", "the mean is not finite"
        return None

    def _count(self, layout: _Layout, members: int) -> None:
        if self.counters:
            moved = 2 * (members - 1) * self.width * layout.averager.total_size // members
            self.counters.bytes_sent += moved
            self.counters.bytes_received += moved

    def _refuse(self, round_: int, reason: str, detail: str) -> None:
        log.warning("averaging round %d: the group's mean is refused (%s): %s", round_, reason, detail)
        if self.counters:
            self.counters.reject(reason)

    def close(self) -> None:
        """Stop every layout's averager, all at once: each may take hivemind's grace period to stop."""
        if self._closed:
            return
        self._closed = True
        closing = [threading.Thread(target=layout.close, name="averager-closing") for layout in self._layouts.values()]
        for thread in closing:
            thread.start()
        for thread in closing:
            thread.join()


def layout_prefix(prefix: str, names: Sequence[str]) -> str:
    """The group prefix of the averager of the tensors ``names``: groups of different layouts (of
    different fragments of the model) never match. A digest: a tensor's name may hold a dot."""
    digest = hashlib.sha256("\0".join(names).encode()).hexdigest()[:16]
    return f"{prefix}_{digest}"


class _Layout:
    """The hivemind averager of one layout: some of the reference's tensors, by name. Its process
    is forked on the layout's first round and awaited within that round's timeout, so that round's
    group forms that much later (see the module's docstring); later rounds find it running."""

    def __init__(self, names: tuple[str, ...], averager: _Averager, matchmaking_time: float):
        """Start ``averager`` (not started yet), which averages the tensors ``names`` in this order."""
        self.names, self.averager, self.matchmaking_time = names, averager, matchmaking_time
        self.last_step: StepControl | None = None  # the step started last, which may still run
        # hivemind ignores SIGINT in the process that starts it, and leaves it so: only its own
        # process may ignore Ctrl-C (see children_ignore_ctrl_c). (Only the main thread may.)
        forked = time.monotonic()
        with children_ignore_ctrl_c():
            self.averager.run_in_background(await_ready=False)
        self.started = _daemon_thread(lambda: self._wait_until_started(forked))  # one wait, whichever rounds await it

    def _wait_until_started(self, forked: float) -> None:
        try:
            self.averager.wait_until_ready(STARTUP_SECONDS)
        except BaseException as error:
            log.warning("hivemind's averager of %d tensor(s) did not start: %r", len(self.names), error)
            raise
        log.debug("hivemind's averager of %d tensor(s) started in %.3f s", len(self.names), time.monotonic() - forked)

    async def running(self) -> bool:
        """Whether its process runs, once it has started (or failed to)."""
        try:
            # Shielded: a round given up while it starts must not cancel the one wait.
            await asyncio.shield(asyncio.wrap_future(self.started))
        except Exception:  # noqa: BLE001 - logged as it failed
            return False
        return self.averager.is_alive()

    async def step(self, round_: int, state: State, timeout: float) -> dict[PeerID, Any] | None:
        """One of hivemind's steps with ``state``: the members' gathered values, or None when it failed."""
        if self.last_step is not None and not self.last_step.done():
            # A step given up at its deadline may still be all-reducing; the next must not write
            # the tensors under it. (It ends within the all-reduce and chunk timeouts.)
            await asyncio.wait({asyncio.wrap_future(_follower(self.last_step))})
        # hivemind refuses a step whose group would start after its deadline: start at half of it at the latest.
        starts = get_dht_time() + min(self.matchmaking_time, timeout / 2)
        try:
            control = await _in_daemon_thread(lambda: self._begin(state, round_, starts, timeout))
            return await asyncio.wrap_future(_follower(control))
        except Exception as error:  # noqa: BLE001 - no group, a member gone: the peer keeps its own tensors
            log.info("averaging round %d failed: %r", round_, error)
            return None

    def _begin(self, state: State, round_: int, starts: float, timeout: float) -> StepControl:
        """Copy ``state`` into the averager's tensors and start a step (blocking: the averager's lock and pipe)."""
        with self.averager.get_tensors() as tensors:
            for tensor, name in zip(tensors, self.names):
                tensor.copy_(state[name].detach())
        # Each round is matched under a key of its own: a peer still looking for its group of a
        # round is never matched with the peers of the next (whose round it would spoil).
        self.averager.set_group_bits(format(round_, "b"))
        self.last_step = self.averager.step(
            gather=round_, scheduled_time=starts, weight=1.0, timeout=timeout, allow_retries=False, wait=False
        )
        return self.last_step

    def read(self) -> list[torch.Tensor]:
        with self.averager.get_tensors() as tensors:
            return [tensor.clone() for tensor in tensors]

    def close(self) -> None:
        if self.averager.is_alive():
            self.averager.shutdown()


def _follower(step: StepControl) -> concurrent.futures.Future:
    """A future that settles as ``step`` does, and that may be cancelled without it: a step given up
    at our deadline still runs (and is waited for before the next). asyncio.wrap_future of the step
    itself would cancel it, and hivemind's cancel of a step fails across processes."""
    follower: concurrent.futures.Future = concurrent.futures.Future()

    def settle(step: StepControl) -> None:
        if not follower.set_running_or_notify_cancel():
            return
        if (error := step.exception()) is not None:
            follower.set_exception(error)
        else:
            follower.set_result(step.result())

    step.add_done_callback(settle)
    return follower


def _daemon_thread(work: Callable[[], T]) -> concurrent.futures.Future[T]:
    """The outcome of ``work``, run in a daemon thread of its own: it may block on the averager's
    process (its pipe, its tensors' lock), which a dead process never answers, and such a thread
    must hold up neither the event loop nor the peer's exit (asyncio's executor is joined at exit).
    Cancelled before the thread runs it, ``work`` is not done."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(work())
            except BaseException as error:  # noqa: BLE001 - handed to whoever awaits the future
                future.set_exception(error)

    threading.Thread(target=run, name="hivemind-averaging", daemon=True).start()
    return future


async def _in_daemon_thread(work: Callable[[], T]) -> T:
    return await asyncio.wrap_future(_daemon_thread(work))
