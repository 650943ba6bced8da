"""Several machines on one Linux host: real peers, each in a network namespace of its own.

Each of --peers peers gets a Linux network namespace with one IPv4 address on a bridge (its
loopback up too, but unused between peers), and, with --rate, a bandwidth cap of that many
Mbit/s in each direction (a `tc tbf` queue on both ends of its veth: uplink and downlink). The
bridge sits in a "switch" namespace of its own, so nothing in the host's own network changes.
The peers run the commands that docs/real-peers.md gives for several machines:

    peer run --swarm NAME --host 0.0.0.0 --port 31337 --shard 0 --shards N --min-peers N --out OUT/peer-0 ...
    peer run --swarm NAME --initial-peers ADDRESS --shard I --shards N --min-peers N --out OUT/peer-I ...

where ADDRESS is what the first peer prints, and the rest are the training flags given after
`--`. The script waits for the peers to finish, reads their summaries and prints JSON: for
each peer its address, the addresses it announced, rounds completed, accuracy, bytes sent,
time to --target-accuracy, messages refused, failed dials and exit code; for the swarm whether
every peer finished, the mean accuracy, the time to the target (the slowest peer's) and the
wall time. --compare-codecs runs the same swarm (same seed, same caps) once per codec and adds
the ratio of the first codec's time to the target to each other's.

It needs root and the `ip` command (and `tc` for --rate). Where network namespaces cannot be
made it says why in one line and exits with code 3. Everything it creates (peer processes,
namespaces, veths, the bridge) is removed at the end, after a failure and on Ctrl-C or SIGTERM.

    .venv/bin/python scripts/hosts_swarm.py --peers 4 --rate 10 -- --rounds 30 --codec int8 --target-accuracy 0.7
    .venv/bin/python scripts/hosts_swarm.py --peers 4 --rate 10 --compare-codecs none,int8 -- --rounds 60 --target-accuracy 0.7

Exit codes: 0 every peer finished, 1 some peer did not (or the swarm did not start), 2 bad
arguments, 3 no namespaces here, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

NOT_PERMITTED = 3
BAD_ARGUMENTS = 2
INTERRUPTED = 130
BOOTSTRAP_PORT = 31337
PEER = Path(sys.executable).parent / "peer"  # the console script of the environment this runs in
ADDRESS_LINE = re.compile(r"others join with --initial-peers (.+)$")
# Flags this script sets for each peer; given after `--` they would contradict it.
OWN_FLAGS = ("--swarm", "--host", "--port", "--host-maddrs", "--initial-peers", "--initial-peers-file",
             "--shard", "--shards", "--min-peers", "--out")
STOP_GRACE_SECONDS = 30
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


# --- can this host make namespaces? ------------------------------------------------------


def ip(*args: str) -> str:
    """Run `ip ARGS`; its output, or CalledProcessError carrying its message."""
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def failure(error: subprocess.CalledProcessError) -> str:
    return (error.stderr or error.stdout or f"exit code {error.returncode}").strip().replace("\n", " ")


def namespace_problem(rate: bool = False) -> str | None:
    """None where this process can make namespaces, veths and a bridge (and, with ``rate``, tbf
    queues); otherwise why not, in one line."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are a Linux feature"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    for tool in ("ip", "tc") if rate else ("ip",):
        if shutil.which(tool) is None:
            return f"the `{tool}` command (iproute2) is not installed"
    probe = f"hs-probe-{secrets.token_hex(3)}"
    try:
        ip("netns", "add", probe)
    except subprocess.CalledProcessError as error:
        return f"`ip netns add` failed: {failure(error)}"
    try:
        ip("-n", probe, "link", "add", "br0", "type", "bridge")
        ip("-n", probe, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1")
        if rate:
            ip("-n", probe, "link", "set", "probe0", "up")
            cap(probe, "probe0", 10.0)
    except subprocess.CalledProcessError as error:
        return f"a bridge, veth pair or tbf queue cannot be made in a namespace: {failure(error)}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True)
    return None


# --- the emulated network ----------------------------------------------------------------


def cap(namespace: str, device: str, mbit: float) -> None:
    """Cap what ``device`` sends at ``mbit`` Mbit/s: a token bucket 1 ms of traffic deep (at least
    4 KiB, a few packets), so that a message of a few kilobytes is not let through at full speed."""
    burst = max(4096, int(mbit * 1e6 / 8 / 1000))
    subprocess.run(
        ["tc", "-n", namespace, "qdisc", "add", "dev", device, "root", "tbf",
         "rate", f"{mbit}mbit", "burst", str(burst), "latency", "100ms"],
        check=True, capture_output=True, text=True,
    )


def random_subnet() -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"10.{random.randint(64, 254)}.{random.randint(0, 255)}.0/24")


class Network:
    """A switch namespace holding a bridge, and one namespace per peer wired to it by a veth pair.

    Names carry a random tag, so runs side by side do not collide; every name lives inside the
    namespaces, which ``remove`` deletes with all they hold."""

    def __init__(self, peers: int, subnet: ipaddress.IPv4Network, rate: float | None):
        self.tag = f"hs-{secrets.token_hex(3)}"
        self.peers, self.subnet, self.rate = peers, subnet, rate
        self.created: list[str] = []

    @property
    def switch(self) -> str:
        return f"{self.tag}-switch"

    def host(self, index: int) -> str:
        return f"{self.tag}-peer{index}"

    def address(self, index: int) -> ipaddress.IPv4Address:
        return self.subnet.network_address + index + 1

    def build(self) -> None:
        self._namespace(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for index in range(self.peers):
            self._wire(index)

    def _namespace(self, name: str) -> None:
        self.created.append(name)  # first: an interrupt right after the add still removes it
        ip("netns", "add", name)
        ip("-n", name, "link", "set", "lo", "up")

    def _wire(self, index: int) -> None:
        host, port = self.host(index), f"port{index}"
        self._namespace(host)
        ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host)
        ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        ip("-n", host, "addr", "add", f"{self.address(index)}/{self.subnet.prefixlen}", "dev", "eth0")
        ip("-n", host, "link", "set", "eth0", "up")
        if self.rate:
            cap(host, "eth0", self.rate)  # what the peer sends
            cap(self.switch, port, self.rate)  # what it receives

    def remove(self) -> None:
        """Kill whatever still runs in the namespaces, then delete them (and their veths and bridge)."""
        for name in reversed(self.created):
            kill_everything_in(name)
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        self.created.clear()


def pids_in(namespace: str) -> list[int]:
    result = subprocess.run(["ip", "netns", "pids", namespace], check=False, capture_output=True, text=True)
    return [int(word) for word in result.stdout.split()]


def kill_everything_in(namespace: str) -> None:
    """SIGKILL the processes in ``namespace`` (the peers' DHT processes, daemons and watchers)."""
    deadline = time.monotonic() + 5
    while (pids := pids_in(namespace)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


# --- the peers ---------------------------------------------------------------------------


class Peers:
    """The peer processes of one swarm, peer I in namespace I, writing to OUT/peer-I."""

    def __init__(self, network: Network, out: Path, training: list[str]):
        self.network, self.out, self.training = network, out, training
        self.name = network.tag
        self.processes: dict[int, subprocess.Popen] = {}

    def log(self, index: int) -> Path:
        return self.out / f"peer-{index}.log"

    def command(self, index: int, bootstrap: list[str]) -> list[str]:
        where = ["--host", "0.0.0.0", "--port", str(BOOTSTRAP_PORT)] if not bootstrap else ["--initial-peers", *bootstrap]
        count = str(self.network.peers)
        return [
            "ip", "netns", "exec", self.network.host(index), str(PEER), "run", "--swarm", self.name, *where,
            "--shard", str(index), "--shards", count, "--min-peers", count, "--out", str(self.out / f"peer-{index}"),
            *self.training,
        ]

    def start(self, index: int, bootstrap: list[str]) -> None:
        with open(self.log(index), "w") as log:
            # A session of its own: the terminal's Ctrl-C reaches this script only, which then
            # asks each peer to save and leave.
            self.processes[index] = subprocess.Popen(
                self.command(index, bootstrap), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def announced(self, index: int) -> list[str]:
        """The multiaddrs peer ``index`` printed for others to join with (none yet: [])."""
        path = self.log(index)
        lines = path.read_text().splitlines() if path.exists() else []
        return next((m.group(1).split() for line in lines if (m := ADDRESS_LINE.search(line))), [])

    def wait_for_address(self, index: int, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while not (found := self.announced(index)):
            process = self.processes[index]
            if process.poll() is not None:
                raise RuntimeError(f"peer {index} exited with code {process.returncode} before printing its address; see {self.log(index)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"peer {index} printed no address within {timeout:g} s; see {self.log(index)}")
            time.sleep(0.2)
        return found

    def wait(self, timeout: float) -> bool:
        """Wait until every peer has exited; False if some still run after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.processes.values()):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    def stop(self) -> None:
        """Ask the peers still running to save and leave (SIGINT), then kill their process groups."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# --- one swarm, start to end -------------------------------------------------------------


@contextlib.contextmanager
def signals_as_interrupts():
    """Ctrl-C, SIGTERM and SIGHUP end the run through the cleanup.

    Caught, not ignored, even where this script was started with SIGINT ignored (in the
    background of a shell): the peers then start with the default handling, and stop when asked."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = {s: signal.signal(s, interrupt) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def signals_ignored():
    """While cleaning up: a second Ctrl-C must not leave namespaces behind."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_swarm(args: argparse.Namespace, training: list[str], out: Path) -> dict:
    """Build the network, run the peers to their end (or --timeout), clean up; the report."""
    out.mkdir(parents=True, exist_ok=True)
    network = Network(args.peers, args.subnet or random_subnet(), args.rate)
    peers = Peers(network, out, training)
    started = time.monotonic()
    finished_in_time = False
    try:
        network.build()
        caps = f"{args.rate:g} Mbit/s each way" if args.rate else "no bandwidth cap"
        print(f"hosts_swarm: {args.peers} peers in namespaces {network.tag}-*, subnet {network.subnet}, {caps}: "
              f"{' '.join(training)}", file=sys.stderr, flush=True)
        peers.start(0, [])
        bootstrap = peers.wait_for_address(0, timeout=args.timeout)
        for index in range(1, args.peers):
            peers.start(index, bootstrap)
        finished_in_time = peers.wait(max(1.0, args.timeout - (time.monotonic() - started)))
    finally:
        with signals_ignored():
            peers.stop()
            network.remove()
    return report(peers, network, time.monotonic() - started, timed_out=not finished_in_time)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def records(metrics: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in metrics.read_text().splitlines()]
    except (OSError, ValueError):
        return []


def seconds_per_round(rounds: list[dict]) -> float | None:
    """The mean wall seconds between a peer's first and last round records: its pace once training."""
    return (rounds[-1]["wall_time"] - rounds[0]["wall_time"]) / (len(rounds) - 1) if len(rounds) > 1 else None


def clock_start(rounds: list[dict]) -> float | None:
    """The Unix time at which the peer's clock started (its times to the target count from there)."""
    return rounds[0]["wall_time"] - rounds[0]["virtual_time"] if rounds else None


def on_bridge(address: str, network: Network) -> bool:
    """Whether a multiaddr names an address of the emulated bridge (not the loopback)."""
    parts = address.split("/")
    try:
        return len(parts) > 2 and ipaddress.ip_address(parts[2]) in network.subnet
    except ValueError:
        return False


def peer_report(peers: Peers, index: int) -> dict:
    network, folder = peers.network, peers.out / f"peer-{index}"
    summary = read_json(folder / "summary.json")
    announced = peers.announced(index)
    rounds = summary.get("rounds_completed")
    history = records(folder / "metrics.jsonl")
    return {
        "peer": index,
        "address": str(network.address(index)),
        "announced": announced,
        "announced_on_bridge": bool(announced) and all(on_bridge(a, network) for a in announced),
        "exit_code": peers.processes[index].returncode if index in peers.processes else None,
        "rounds": summary.get("rounds"),
        "rounds_completed": rounds,
        "mean_accuracy": summary.get("mean_accuracy"),
        "bytes_sent_total": summary.get("bytes_sent_total"),
        "bytes_sent_per_round": summary["bytes_sent_total"] / rounds if rounds else None,
        "seconds_per_round": seconds_per_round(history),
        "rounds_to_target": summary.get("rounds_to_target"),
        "wall_seconds_to_target": summary.get("wall_seconds_to_target"),
        "clock_started": clock_start(history),
        "rejected_total": summary.get("rejected_total"),
        "failed_dials": sum((summary.get("failed_dials") or {}).values()),
        "missed_exchanges_total": summary.get("missed_exchanges_total"),
        "log": str(peers.log(index)),
    }


def time_to_target(rows: list[dict]) -> dict:
    """When the swarm reached the target: when its slowest peer did.

    Each peer counts from the start of its own clock, and the first peer waits there for the
    others to start, so its figure also holds their start-up. The swarm's figure counts from the
    moment the last peer started (when the swarm can train at all) to the moment the last peer
    reached the target; the slowest peer's own figure is given beside it."""
    own = [row["wall_seconds_to_target"] for row in rows]
    starts = [row["clock_started"] for row in rows]
    if not rows or None in own or None in starts:
        return {"wall_seconds_to_target": None, "slowest_peer_wall_seconds_to_target": None}
    reached = max(start + seconds for start, seconds in zip(starts, own))
    return {"wall_seconds_to_target": round(reached - max(starts), 3), "slowest_peer_wall_seconds_to_target": max(own)}


def report(peers: Peers, network: Network, wall_seconds: float, *, timed_out: bool) -> dict:
    rows = [peer_report(peers, index) for index in range(network.peers)]
    accuracies = [row["mean_accuracy"] for row in rows if row["mean_accuracy"] is not None]
    paces = [row["seconds_per_round"] for row in rows if row["seconds_per_round"] is not None]
    return {
        "peers": rows,
        "swarm": {
            "name": peers.name,
            "subnet": str(network.subnet),
            "rate_mbit": network.rate,
            "all_finished": all(
                row["exit_code"] == 0 and row["rounds_completed"] is not None and row["rounds_completed"] == row["rounds"]
                for row in rows
            ),
            "announced_on_bridge": all(row["announced_on_bridge"] for row in rows),
            "mean_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
            **time_to_target(rows),
            "seconds_per_round": sum(paces) / len(paces) if paces else None,
            "wall_seconds": round(wall_seconds, 2),
            "timed_out": timed_out,
        },
    }


# --- the command line --------------------------------------------------------------------


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    own, training = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="training flags for `peer run` follow `--`")
    parser.add_argument("--peers", type=int, default=4, help="how many peers, each in its own namespace (default 4)")
    parser.add_argument("--rate", type=float, help="cap each peer's uplink and downlink at this many Mbit/s")
    parser.add_argument("--out", type=Path, help="folder for the peers' folders and logs (default: runs/hosts-<time>)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before the peers are stopped (default 600)")
    parser.add_argument("--subnet", type=ipaddress.IPv4Network, help="the bridge's IPv4 subnet (default: a random 10.x.y.0/24)")
    parser.add_argument("--compare-codecs", help="run the swarm once per codec, e.g. none,int8, and compare times to the target")
    parser.add_argument("--repeat", type=int, default=1, help="with --compare-codecs: run each codec this many times, in turn")
    args = parser.parse_args(own)
    if args.peers < 2:
        parser.error("--peers must be at least 2")
    if args.repeat < 1 or (args.repeat > 1 and not args.compare_codecs):
        parser.error("--repeat is a whole number >= 1, for --compare-codecs")
    if args.subnet is not None and args.subnet.num_addresses < args.peers + 2:
        parser.error(f"--subnet {args.subnet} has no room for {args.peers} peers")
    if clash := next((flag for flag in training if flag.split("=")[0] in OWN_FLAGS), None):
        parser.error(f"{clash} is set by this script for each peer; leave it out of the training flags")
    if args.compare_codecs and any(flag.split("=")[0] == "--codec" for flag in training):
        parser.error("--compare-codecs sets --codec for each run; leave it out of the training flags")
    return args, training


def folder_name(codec: str) -> str:
    return "codec-" + re.sub(r"[^A-Za-z0-9.]+", "_", codec)


def compare(args: argparse.Namespace, training: list[str], out: Path) -> dict:
    """The same swarm once per codec, --repeat times in turn (so that a change in the host's load
    falls on every codec alike); the first codec's median time to the target over each other's."""
    codecs = [codec.strip() for codec in args.compare_codecs.split(",") if codec.strip()]
    runs: dict[str, list[dict]] = {codec: [] for codec in codecs}
    for attempt in range(1, args.repeat + 1):
        for codec in codecs:
            folder = out / (folder_name(codec) + (f"-{attempt}" if args.repeat > 1 else ""))
            runs[codec].append(run_swarm(args, [*training, "--codec", codec], folder))
    times = {codec: median([run["swarm"]["wall_seconds_to_target"] for run in runs[codec]]) for codec in codecs}
    first = times[codecs[0]]
    ratios = {f"{codecs[0]}/{codec}": round(first / times[codec], 3) if first and times[codec] else None for codec in codecs[1:]}
    return {"runs": runs, "median_wall_seconds_to_target": times, "time_to_target_ratio": ratios}


def median(values: list[float | None]) -> float | None:
    """The median, or None where some run did not reach the target."""
    return statistics.median(values) if values and None not in values else None


def main(argv: list[str]) -> int:
    args, training = parse(argv)
    if problem := namespace_problem(rate=args.rate is not None):
        print(f"hosts_swarm: cannot emulate hosts here: {problem}", file=sys.stderr)
        return NOT_PERMITTED
    out = args.out or Path("runs") / f"hosts-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()):
        print(f"hosts_swarm: --out {out} is not empty; choose a new folder", file=sys.stderr)
        return BAD_ARGUMENTS
    settings = {"peers": args.peers, "rate_mbit": args.rate, "training_flags": training, "out": str(out)}
    try:
        with signals_as_interrupts():
            result = compare(args, training, out) if args.compare_codecs else run_swarm(args, training, out)
    except KeyboardInterrupt:
        print("hosts_swarm: interrupted; the peers, namespaces and veths are removed", file=sys.stderr)
        return INTERRUPTED
    except (RuntimeError, subprocess.CalledProcessError) as error:
        detail = failure(error) if isinstance(error, subprocess.CalledProcessError) else str(error)
        print(f"hosts_swarm: {detail}", file=sys.stderr)
        return 1
    json.dump({"settings": settings, **result}, sys.stdout, indent=1)
    print()
    swarms = [run["swarm"] for runs in result["runs"].values() for run in runs] if args.compare_codecs else [result["swarm"]]
    return 0 if all(swarm["all_finished"] for swarm in swarms) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
