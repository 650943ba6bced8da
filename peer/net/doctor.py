"""`peer doctor`: would a `peer run` with these settings join its swarm, and be reached there?

Given the settings of `peer run`, the doctor checks, in order, what a peer needs: an address it
can listen at, bootstrap peers that answer, addresses that the swarm's peers can dial, the
swarm's key, a clock that agrees with theirs, and the same version, task and model. It prints one
line per check ("ok: ...", "warning: ...", "skipped: ..." or "problem: <what is wrong>; <what
to do>"), then a result; it exits 0 only when there is no problem.

Everything it learns from outside comes from a short-lived DHT node of its own (a fresh identity,
listening where `peer run` would listen, so that the ports it checks are the ones a peer would
use) and from one dial-back request (peer.net.dialback) to a peer of the swarm. Each network step
is bounded (``NETWORK_STEP_SECONDS``, or --join-timeout if shorter), and whatever the doctor
started is stopped however it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

from peer.config import RunConfig, is_loopback
from peer.errors import ConfigError
from peer.net.access import PROOF_FUTURE_SECONDS, PUBLIC, Access, access_from
from peer.net.dialback import (
    BUSY,
    MAX_PORTS,
    OK,
    STALE_PROOF,
    TOO_SOON,
    WRONG_KEY,
    DialBackAnswer,
    DialBackUnavailable,
    ask_dial_back,
    package_version,
    requested_port,
)
from peer.net.membership import Membership, PeerRecord
from peer.net.ports import bind_problem
from peer.net.reaper import descendants, kill_all

NETWORK_STEP_SECONDS = 15.0
MAX_ASKED = 3  # peers asked for a dial back before the doctor gives up
BOOTSTRAP_FAILED = ("failed to connect to bootstrap peers", "Daemon failed to start in")
PRIVATE_WITHOUT_KEY = (
    "the swarm is private: its peers refuse peers without its key", "give --swarm-key with the swarm's key file"
)
DIAL_TODO = "open the port, or give --announce-maddrs with the address others reach you at, or run with --client-mode"


@dataclass(frozen=True)
class Finding:
    verdict: str  # ok, warning, skipped or problem
    text: str

    def __str__(self) -> str:
        return f"{self.verdict}: {self.text}"


def ok(text: str) -> Finding:
    return Finding("ok", text)


def warning(text: str) -> Finding:
    return Finding("warning", text)


def skipped(text: str) -> Finding:
    return Finding("skipped", text)


def problem(what: str, todo: str) -> Finding:
    return Finding("problem", f"{what}; {todo}")


class DHTFailed(Exception):
    """The doctor's DHT node did not start; ``bootstrap`` when its bootstrap peers did not answer."""

    def __init__(self, reason: str, bootstrap: bool):
        super().__init__(reason)
        self.bootstrap = bootstrap


class Probe:
    """What the checks find out (each network step done once, when a check first needs it) and
    what they started, to be stopped by ``close``."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.step = min(NETWORK_STEP_SECONDS, config.join_timeout)
        self.access, self.access_error = _access(config)
        self.listening = not config.client_mode  # False too once the listen address is found taken
        self.dht: hivemind.DHT | None = None
        self.p2p: P2P | None = None
        self.announced: list[str] = []  # what `peer run` would announce, as it would pick them
        self.key_mismatch = False  # the swarm's records are out of this peer's reach
        self.unanswered = ""  # why no peer answered the dial-back request
        self._asked = False
        self._answer: DialBackAnswer | None = None
        self._records: list[PeerRecord] | None = None
        self.records_error = ""

    @property
    def ports(self) -> list[int]:
        """The TCP ports of the announced addresses, for the dial-back request."""
        return list(dict.fromkeys(p for p in map(requested_port, self.announced) if p is not None))[:MAX_PORTS]

    async def start_dht(self) -> None:
        # Blocking on purpose: a Ctrl-C while it starts then reaches the start, which stops what it started.
        self.dht = _start_dht(self.config, self.listening, self.step)
        if self.listening:
            visible = await asyncio.to_thread(self.dht.get_visible_maddrs)
            # Without the doctor's own peer id: the peer's would be another.
            self.announced = [a.split("/p2p/")[0] for a in self.config.announced([str(a) for a in visible])]
        self.p2p = await self.dht.replicate_p2p()

    async def dial_back(self) -> DialBackAnswer | None:
        """One peer's answer to a dial-back request for this peer's ports, asked once; None when
        no peer of the swarm answered (``unanswered`` says why)."""
        if self._asked or self.p2p is None:
            return self._answer
        self._asked = True
        deadline = time.monotonic() + self.step
        reasons = []
        for peer, record in (await self._candidates())[:MAX_ASKED]:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if record is not None:
                await self._introduce(record, left)
                left = deadline - time.monotonic()
            try:
                answer = await ask_dial_back(self.p2p, peer, self.ports, self.access, timeout=left)
            except DialBackUnavailable as error:
                reasons.append(f"{peer}: {error}")
                continue
            if answer.status in (BUSY, TOO_SOON):
                reasons.append(f"{peer}: {answer.status}")
                continue
            self._answer = answer
            return answer
        self.unanswered = "; ".join(reasons) or "no peer of the swarm to ask"
        return None

    async def _candidates(self) -> list[tuple[str, PeerRecord | None]]:
        """The bootstrap peers (connected already), then the live peers that the swarm's records
        name, with their records."""
        bootstrap = list(dict.fromkeys(filter(None, map(_peer_id_in, self.config.bootstrap_peers))))
        members = [r for r in await self.records() or [] if not r.client and r.peer_id not in bootstrap]
        return [(peer, None) for peer in bootstrap] + [(record.peer_id, record) for record in members]

    async def _introduce(self, record: PeerRecord, timeout: float) -> None:
        """Connect to a peer at the addresses its record announces: the daemon may not know it.
        A failure shows in the request that follows."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(min(timeout, self.step / MAX_ASKED)):
                addresses = [Multiaddr(a) for a in record.addresses]
                await self.p2p._client.connect(PeerID.from_base58(record.peer_id), addresses)

    async def records(self) -> list[PeerRecord] | None:
        """The live records of the swarm, read once; None when they could not be read."""
        if self._records is None and self.dht is not None and not self.records_error:
            reader = Membership(
                self.dht, self.config.swarm, PeerRecord("", [], "", 0), ttl=self.config.record_ttl, access=self.access
            )
            try:
                async with asyncio.timeout(self.step):
                    await reader.refresh()
            except Exception as error:  # noqa: BLE001 - any failure to read is reported, not raised
                self.records_error = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
                return None
            self._records = [record for record, _ in reader.seen.values() if not record.left]
        return self._records

    async def close(self) -> None:
        if self.p2p is not None:
            with contextlib.suppress(Exception):
                await self.p2p.shutdown()
        if self.dht is not None:
            stop_dht(self.dht)


def _access(config: RunConfig) -> tuple[Access, str]:
    """The swarm's rules of entry, or the public ones and why the given ones cannot be read."""
    try:
        return access_from(config.swarm_key, config.allow_peers), ""
    except ConfigError as error:
        return PUBLIC, str(error)


def _peer_id_in(address: str) -> str:
    """The peer id at the end of a bootstrap multiaddr; empty when it is not one."""
    peer = address.rsplit("/p2p/", 1)[-1].split("/")[0]
    try:
        PeerID.from_base58(peer)
    except Exception:  # noqa: BLE001 - base58 and multihash each raise their own errors
        return ""
    return peer


def _start_dht(config: RunConfig, listening: bool, timeout: float) -> hivemind.DHT:
    """A DHT node as `peer run` would start it, with a fresh identity; in client mode, or when it
    cannot listen at its address, a client that dials out only. DHTFailed when it does not start."""
    try:
        dht = hivemind.DHT(
            initial_peers=config.bootstrap_peers,
            host_maddrs=config.listen_maddrs if listening else None,
            announce_maddrs=(config.announce_maddrs or None) if listening else None,
            client_mode=not listening,
            no_listen=not listening,
            use_relay=config.use_relay,
            use_auto_relay=config.use_auto_relay,
            record_validators=[RSASignatureValidator()],  # as peers run it, so that forged records are dropped
            startup_timeout=timeout,
            start=False,
        )
        dht.run_in_background(await_ready=False)
    except Exception as error:  # noqa: BLE001 - hivemind checks its arguments with errors of every kind
        raise DHTFailed(_one_line(error), False) from None
    try:
        # The daemon's own timeout comes first; this one bounds what follows it (the DHT's bootstrap).
        dht.wait_until_ready(timeout + 5)
    except BaseException as error:
        stop_dht(dht)
        if not isinstance(error, Exception):
            raise
        reason = _one_line(error) if str(error) else f"no answer within {timeout:g} s"
        raise DHTFailed(reason, isinstance(error, TimeoutError) or any(s in reason for s in BOOTSTRAP_FAILED)) from None
    return dht


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def stop_dht(dht: hivemind.DHT) -> None:
    """Stop a DHT process and its p2p daemon, killing them if they do not stop in time."""
    started = descendants(dht.pid) if dht.pid else {}
    dht.shutdown()
    kill_all(started)



def this_fingerprint(config: RunConfig) -> str:
    """The fingerprint that `peer run` would announce: it builds the task and the trainer."""
    from peer.net.node import prepare_training

    return prepare_training(config, None).digest


# --- the checks, in order -------------------------------------------------------------------


async def check_listen_address(probe: Probe) -> Finding:
    config = probe.config
    if config.client_mode:
        return ok("client mode: this peer listens nowhere, so it needs no address to listen at")
    for address in config.listen_maddrs:
        endpoint = _tcp_endpoint(address)
        reason = bind_problem(*endpoint) if endpoint else None
        if reason:
            probe.listening = False
            return problem(
                f"cannot listen at {address}: {reason}",
                "stop that process, or give another --port (0 takes any free port) or --host",
            )
    return ok(f"this peer can listen at {' '.join(config.listen_maddrs)}")


def _tcp_endpoint(address: str) -> tuple[str, int] | None:
    parts = address.split("/")
    if len(parts) >= 5 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp" and parts[4].isdigit():
        return parts[2], int(parts[4])
    return None


async def check_bootstrap_peers(probe: Probe) -> Finding:
    config = probe.config
    given = len(config.bootstrap_peers)
    try:
        await probe.start_dht()
    except DHTFailed as error:
        if given and error.bootstrap:
            who = "the bootstrap peer did not answer" if given == 1 else f"none of the {given} bootstrap peers answered"
            return problem(
                f"{who} within {probe.step:g} s",
                "check the addresses (a peer prints them as it starts) and that their port is open",
            )
        return problem(
            f"could not start a DHT node: {error}",
            "check --host, --port, --host-maddrs, --announce-maddrs and --initial-peers",
        )
    if not given:
        return ok(f"no bootstrap peers: this peer would start a new swarm {config.swarm!r}")
    return ok(f"the DHT node joined through the bootstrap peers ({given} given)")


async def check_dialable(probe: Probe) -> Finding:
    config = probe.config
    if config.client_mode:
        return ok("client mode: this peer dials out and accepts no connections")
    if probe.dht is None:
        return skipped("cannot check that peers can dial this peer: its DHT node did not start (see above)")
    if not probe.listening:
        return skipped("cannot check that peers can dial this peer: it cannot listen at its address (see above)")
    unreachable_here = _loopback_problem(config, probe.announced)
    if unreachable_here:
        return unreachable_here
    if not config.bootstrap_peers:
        addresses = " ".join(probe.announced)
        return skipped(f"a new swarm: no peer to dial this one back; peers that join must reach {addresses}")
    if not probe.ports:
        return skipped(f"this peer would announce no TCP address to dial ({' '.join(probe.announced)})")
    answer = await probe.dial_back()
    if answer is None:
        return warning(f"could not check that peers can dial this peer: {probe.unanswered}")
    if answer.status in (WRONG_KEY, STALE_PROOF):
        return skipped("the swarm's peers dial back only peers that prove its key (see the swarm key below)")
    if answer.status != OK:
        return warning(f"could not check that peers can dial this peer: peer {answer.peer} answered {answer.status}")
    return _dial_results(answer, probe.ports)


def _loopback_problem(config: RunConfig, announced: list[str]) -> Finding | None:
    """A peer on another host cannot reach this one at a loopback address: it would reach itself."""
    if all(is_loopback(address) for address in config.bootstrap_peers):
        return None
    if all(is_loopback(address) for address in config.listen_maddrs):
        return problem(
            f"this peer listens only on the loopback ({' '.join(config.listen_maddrs)}) while its bootstrap peers "
            "are on another host, from where nobody can dial it",
            "give --host 0.0.0.0 (every interface), or --host with an address of this host that they reach",
        )
    local = [address for address in announced if is_loopback(address)]
    if local:
        return problem(
            f"this peer would announce {local[0]}, a loopback address, to peers on another host",
            "give --announce-maddrs with the address others reach you at",
        )
    return None


def _dial_results(answer: DialBackAnswer, ports: list[int]) -> Finding:
    checked = {check.port: check for check in answer.ports}
    reached = [checked[p].address for p in ports if p in checked and checked[p].error is None]
    failed = ", ".join(f"{checked[p].address} ({checked[p].error})" for p in ports if p in checked and checked[p].error)
    if failed and not reached:
        return problem(f"peers cannot dial {failed}", DIAL_TODO)
    if failed:
        return warning(f"peers cannot dial {failed}; peer {answer.peer} reached this peer at {' '.join(reached)}")
    if not reached:
        return warning(f"could not check that peers can dial this peer: peer {answer.peer} tried none of its ports")
    return ok(f"peers can dial this peer: peer {answer.peer} reached it at {' '.join(reached)}")


async def check_swarm_key(probe: Probe) -> Finding:
    if probe.access_error:
        probe.key_mismatch = True
        return Finding("problem", probe.access_error)  # it says what to do
    private = probe.access.private
    if probe.dht is None:
        return skipped("cannot check the swarm key: the DHT node did not start (see above)")
    if not probe.config.bootstrap_peers and private:
        return ok("a new private swarm: peers that join need its key")
    if not probe.config.bootstrap_peers:
        return ok("a new public swarm: no key needed")
    answer = await probe.dial_back()
    if answer is None:
        return warning(f"could not check the swarm key: {probe.unanswered}")
    if answer.status == WRONG_KEY:
        probe.key_mismatch = True
        if private:
            return problem("the swarm's peers refuse this peer's swarm key", "give the --swarm-key file that they use")
        return problem(*PRIVATE_WITHOUT_KEY)
    if answer.status == STALE_PROOF:
        return problem(
            "the swarm's peers refuse this peer's proof of the swarm key as stale: the clocks disagree (see below)",
            "synchronise the clock (NTP)",
        )
    if answer.status != OK:
        return warning(f"could not check the swarm key: peer {answer.peer} answered {answer.status}")
    if answer.private == private:
        return ok("the swarm's peers accept this peer's swarm key" if private else "a public swarm: no key needed")
    probe.key_mismatch = True
    if private:
        return problem(
            "the swarm is public, but this peer has --swarm-key: it would look for the members of a private swarm "
            "and find none",
            "leave out --swarm-key, or give the key to every peer of the swarm",
        )
    return problem(*PRIVATE_WITHOUT_KEY)


def clock_tolerance(config: RunConfig) -> float:
    """How far clocks may disagree: well within what proofs of the swarm key allow ahead of the
    receiver's clock, and within a part of a record's lifetime (records expire by the wall clock)."""
    return min(PROOF_FUTURE_SECONDS, config.record_ttl) / 2


async def check_clock(probe: Probe) -> Finding:
    answer = await probe.dial_back()
    if answer is None:
        return skipped("no other peer's clock to compare with")
    tolerance = clock_tolerance(probe.config)
    # The peer read its clock between our two readings: it agrees when it lies within them.
    behind, ahead = answer.time - answer.answered_at, answer.asked_at - answer.time
    if max(behind, ahead) > tolerance:
        where = f"{behind:.1f} s behind" if behind > ahead else f"{ahead:.1f} s ahead of"
        return problem(
            f"this host's clock is {where} that of peer {answer.peer}, more than the {tolerance:g} s peers allow "
            "(records expire by the wall clock, and proofs of the swarm key carry its time)",
            "synchronise the clock (NTP)",
        )
    round_trip = answer.answered_at - answer.asked_at
    return ok(
        f"this host's clock agrees with that of peer {answer.peer} within {tolerance:g} s "
        f"(round trip {round_trip:.2f} s)"
    )


async def check_version(probe: Probe) -> Finding:
    answer = await probe.dial_back()
    if answer is None:
        return skipped("no other peer's version to compare with")
    ours = package_version()
    if answer.version == ours:
        return ok(f"peer {answer.peer} runs version {ours}, as this peer does")
    return warning(
        f"peer {answer.peer} runs version {answer.version}, this peer {ours}; peers of different versions work "
        "together as long as their fingerprints agree (next check)"
    )


async def check_fingerprint(probe: Probe) -> Finding:
    swarm = probe.config.swarm
    if probe.dht is None:
        return skipped("cannot read the swarm's records: the DHT node did not start (see above)")
    if probe.key_mismatch:
        return skipped(f"the records of swarm {swarm!r} are read with its key (see above)")
    try:
        digest = await asyncio.to_thread(this_fingerprint, probe.config)
    except Exception as error:  # noqa: BLE001 - `peer run` would fail on it as well: that is the finding
        return problem(
            f"cannot build this peer's task and model: {error}", "check --task, --data-dir and the training settings"
        )
    records = await probe.records()
    if records is None:
        return warning(f"could not read the records of swarm {swarm!r}: {probe.records_error}")
    others = Counter(record.fingerprint[:32] for record in records if record.fingerprint != digest)
    live, mismatched = len(records), sum(others.values())
    if not live:
        return ok(f"swarm {swarm!r} has no live peers: this peer would be its first (fingerprint {digest})")
    if not mismatched:
        return ok(
            f"the {live} live peers of swarm {swarm!r} train the same task and model as this peer "
            f"(fingerprint {digest})"
        )
    theirs = _printable(others.most_common(1)[0][0])
    if mismatched < live:
        return warning(
            f"{mismatched} of the {live} live peers of swarm {swarm!r} train another task, model or method "
            f"(fingerprint {theirs}); this peer would mix with the {live - mismatched} that match "
            f"(fingerprint {digest})"
        )
    return problem(
        f"the {live} peers of swarm {swarm!r} train another task, model or method (fingerprint {theirs}, this "
        f"peer's {digest})",
        "use the same --task, --algorithm and model as they do, and the same kind of exchange (with or without "
        "error feedback: --error-feedback, --codec)",
    )


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


Check = Callable[[Probe], Awaitable[Finding]]
CHECKS: list[Check] = [
    check_listen_address,
    check_bootstrap_peers,
    check_dialable,
    check_swarm_key,
    check_clock,
    check_version,
    check_fingerprint,
]


def result(findings: list[Finding], swarm: str) -> str:
    problems = sum(f.verdict == "problem" for f in findings)
    if not problems:
        return f"result: a `peer run` with these settings would join swarm {swarm!r}"
    if problems == 1:
        return "result: 1 problem: fix it before `peer run`"
    return f"result: {problems} problems: fix them before `peer run`"


async def diagnose(config: RunConfig, say: Callable[[str], None] = print) -> int:
    """Run the checks in order, saying each finding as it comes; 0 when none is a problem."""
    probe = Probe(config)
    findings = []
    try:
        for check in CHECKS:
            findings.append(await check(probe))
            say(str(findings[-1]))
    finally:
        await probe.close()
    say(result(findings, config.swarm))
    return 1 if any(f.verdict == "problem" for f in findings) else 0


def run_doctor(config: RunConfig, say: Callable[[str], None] | None = None) -> int:
    """`peer doctor`: 0 when a `peer run` with ``config`` would join its swarm, 1 otherwise."""
    return asyncio.run(diagnose(config, say or (lambda line: print(line, flush=True))))
