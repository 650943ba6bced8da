"""Nothing a peer starts outlives it: a watcher that kills the peer's processes when the peer dies.

A peer starts a DHT process, which starts a libp2p daemon. A peer that exits normally stops
them, but one killed outright (SIGKILL, the OOM killer, a crash in native code) cannot, and
they would run on as orphans holding its identity. The watcher is a small process of its own,
started by the peer, in a session of its own so that Ctrl-C does not reach it. Twice a second
it notes every process descended from the peer; once it is no longer the peer's child (the
peer has exited, however), it kills those that are still alive and exits. A process id reused
since is left alone: the start time must match. (It watches its parent rather than a pipe
because the DHT process is forked from the peer and would hold the pipe open.) Linux only:
where there is no /proc, it watches nothing.

    python -m peer.net.reaper PID
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PROC = Path("/proc")
SCAN_SECONDS = 0.5


def process_table() -> dict[int, tuple[int, str]]:
    """Every process's parent and start time, by process id."""
    table = {}
    for entry in PROC.iterdir() if PROC.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone since the listing
            continue
        # The command name (field 2) may hold spaces and parentheses; the fields after it do not.
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def descendants(root: int, table: dict[int, tuple[int, str]] | None = None) -> dict[int, str]:
    """The processes descended from ``root`` (not root itself), with their start times."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, frontier = {}, [root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in found:
                found[child] = table[child][1]
                frontier.append(child)
    return found


def kill_all(processes: dict[int, str]) -> None:
    table = process_table()
    for pid, started in processes.items():
        if pid in table and table[pid][1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def watch(owner: int) -> None:
    """Note the owner's descendants for as long as it is this process's parent, then kill them."""
    me = os.getpid()
    seen: dict[int, str] = {}
    while os.getppid() == owner:
        current = descendants(owner)
        current.pop(me, None)
        seen.update(current)
        time.sleep(SCAN_SECONDS)
    kill_all(seen)


def start_reaper() -> subprocess.Popen:
    """Start the watcher of this process."""
    return subprocess.Popen(
        [sys.executable, "-m", "peer.net.reaper", str(os.getpid())], stdin=subprocess.DEVNULL, start_new_session=True
    )


if __name__ == "__main__":
    watch(int(sys.argv[1]))
