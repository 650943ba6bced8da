"""Whether a TCP port can be listened on, and which process holds it when it cannot.

The p2p daemon reports a port in use as a failure to start; a user needs to know which process
holds the port (often a peer left running) to decide what to do. On Linux the holder is found
from /proc: the listening socket's inode in /proc/net/tcp{,6}, then the process with that socket
open. Elsewhere, or for another user's process, the port is only said to be in use.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

LISTEN = "0A"  # the TCP state of a listening socket in /proc/net/tcp


def bind_problem(host: str, port: int) -> str | None:
    """None when a TCP socket can listen at ``host``:``port`` now, else a one-line reason."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the daemon does, so that a port left in TIME_WAIT by a stopped peer counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return _describe(error, host, port)
    return None


def _describe(error: OSError, host: str, port: int) -> str:
    if error.errno == errno.EADDRINUSE:
        holder = port_holder(port)
        return f"port {port} is in use" + (f" by {holder}" if holder else " by another process")
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine"
    if error.errno == errno.EACCES:
        return f"port {port} needs privileges to listen on (ports below 1024 do)"
    return f"cannot listen at {host}:{port} ({error.strerror or error})"


def port_holder(port: int) -> str | None:
    """The process that listens on TCP ``port``, as "pid N (command line)", or None. A p2p daemon
    is named with the peer that started it (through its DHT process), which is what to stop."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    for process in Path("/proc").iterdir():
        if process.name.isdigit() and _holds_any(process, inodes):
            return _described(process) + _starter(process)
    return None


def _described(process: Path) -> str:
    return f"pid {process.name} ({_command_line(process)})"


def _starter(process: Path) -> str:
    """", started by <the daemon's grandparent>", for a p2p daemon, or ""."""
    if "p2pd" not in _command_line(process):
        return ""
    ancestor = _parent(_parent(process))  # the daemon's parent is the peer's DHT process, a fork of the peer
    return f", started by {_described(ancestor)}" if ancestor else ""


def _parent(process: Path | None) -> Path | None:
    try:
        # The command name in /proc/PID/stat is in parentheses and may hold spaces: the fields follow it.
        ppid = int((process / "stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError, TypeError):
        return None
    return Path("/proc") / str(ppid) if ppid > 1 else None


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def _holds_any(process: Path, inodes: set[str]) -> bool:
    try:
        descriptors = list((process / "fd").iterdir())
    except OSError:  # gone, or another user's
        return False
    return any(_socket_inode(fd) in inodes for fd in descriptors)


def _socket_inode(descriptor: Path) -> str | None:
    try:
        link = str(descriptor.readlink())
    except OSError:  # closed since the folder was listed
        return None
    return link[8:-1] if link.startswith("socket:[") else None


def _command_line(process: Path) -> str:
    try:
        words = (process / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return "?"
    text = " ".join(" ".join(word.decode(errors="replace").split()) for word in words)
    return text if len(text) <= 120 else text[:117] + "..."


def listen_problem(maddrs: list[str]) -> str | None:
    """The first reason a TCP multiaddr of ``maddrs`` cannot be listened on, naming it, or None."""
    for address in maddrs:
        parts = address.split("/")
        tcp = len(parts) >= 5 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp" and parts[4].isdigit()
        if tcp and (problem := bind_problem(parts[2], int(parts[4]))):
            return f"cannot listen at {address}: {problem}"
    return None
