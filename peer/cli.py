"""The `peer` command line."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from peer.config import C, ConfigError, RunConfig, SimulationConfig, SwarmConfig, build_config, load_toml
from peer.metrics import RoundRecord
from peer.tasks import PartitionError, TaskError
from topology import TOPOLOGY_NAMES, TopologyError

USER_ERRORS = (ConfigError, TaskError, PartitionError, TopologyError)


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad flags get one line that names the problem, and exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _flag_type(annotation: Any) -> tuple[Any, list[str] | None, str | None]:
    """argparse's type, choices and nargs for a settings field."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str, list(typing.get_args(annotation)), None
    if origin is list:
        return typing.get_args(annotation)[0], None, "*"
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return (args[0] if args else annotation), None, None


def add_config_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One flag per setting; unset flags stay absent so that a config file can supply them."""
    extra_help = {
        "topology": "one of " + ", ".join(TOPOLOGY_NAMES),
    }
    for name, field in model.model_fields.items():
        kind, choices, nargs = _flag_type(field.annotation)
        described = extra_help.get(name) or field.description or ""
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=kind,
            choices=choices,
            nargs=nargs,
            default=argparse.SUPPRESS,
            help=f"{described} (default: {field.default})".strip(),
        )
    parser.add_argument("--config", type=Path, default=None, help="TOML file with the same settings; flags win")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="peer", description="Peer-to-peer gossip training.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    settings_commands = [
        ("simulate", SimulationConfig, "simulate many peers in one process on a virtual network",
         "Simulate a swarm of peers on one host: an emulated network, a virtual clock, real training."),
        ("run", RunConfig, "run one peer on the network",
         "Run a peer: join the swarm at --initial-peers (or start one), train, gossip, and leave on Ctrl-C."),
        ("swarm", SwarmConfig, "run N real peer processes on this host over loopback",
         "Start N peers as separate processes over loopback; the first bootstraps the others."),
    ]
    for name, model, summary, description in settings_commands:
        add_config_flags(commands.add_parser(name, help=summary, description=description), model)
    status = commands.add_parser(
        "status", help="list the peers of a swarm", description="List the peers that the DHT knows for a swarm."
    )
    status.add_argument("--initial-peers", nargs="+", default=[], help="multiaddrs of any peer or DHT node of the swarm")
    status.add_argument("--swarm", default="gossip", help="swarm name (default: gossip)")
    status.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the DHT (default: 30)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def _summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=summary["label"], show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    rows = [
        ("task / partition", f"{summary['task']} / {summary['partition']}"),
        ("peers / topology", f"{summary['peers']} / {summary['topology']} (spectral gap {summary['spectral_gap']:.4f})"),
        ("rounds x local steps", f"{summary['rounds']} x {summary['local_steps']}"),
        ("codec / error feedback", f"{summary['codec']} / {summary['error_feedback']}"),
        ("test accuracy: mean", f"{summary['mean_accuracy']:.4f}"),
        ("test accuracy: min / max", f"{summary['min_accuracy']:.4f} / {summary['max_accuracy']:.4f}"),
        ("consensus distance", f"{summary['consensus_distance']:.4g}"),
        ("bytes sent, all peers", f"{summary['bytes_sent_total'] / 1e6:.2f} MB"),
        ("missed exchanges", str(summary["missed_exchanges_total"])),
        ("simulated time", f"{summary['virtual_seconds']:.1f} s"),
        ("wall time", f"{summary['wall_seconds']:.1f} s"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def config_from_args(args: argparse.Namespace, model: type[C]) -> C:
    """The settings of a command: defaults, then --config's file, then the flags given."""
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    return build_config(model, load_toml(args.config) if args.config else {}, flags)


def run_simulate(args: argparse.Namespace) -> int:
    from peer.simulate import simulate  # torch is imported only when a command needs it

    config = config_from_args(args, SimulationConfig)
    console = Console(stderr=True)
    with _progress(console) as progress:
        bar = progress.add_task("simulating", total=config.peers * config.rounds, status="")

        def advance(record: RoundRecord) -> None:
            status = f"round {record.round + 1}/{config.rounds}"
            if record.accuracy is not None:
                status += f"  {record.peer} acc {record.accuracy:.3f}"
            progress.update(bar, advance=1, status=status)

        result = simulate(config, on_record=advance)
    Console().print(_summary_table(result.summary))
    if config.out:
        Console().print(f"metrics: {config.out / 'metrics.jsonl'}   summary: {config.out / 'summary.json'}")
    return 0


def run_run(args: argparse.Namespace) -> int:
    import uvloop

    from peer.net.node import run_peer

    config = config_from_args(args, RunConfig)

    def show(record: RoundRecord) -> None:
        accuracy = "" if record.accuracy is None else f"  accuracy {record.accuracy:.4f}"
        print(
            f"round {record.round + 1}/{config.rounds}{accuracy}  neighbours {record.neighbours_heard}/"
            f"{record.neighbours_expected}  sent {record.bytes_sent / 1e6:.1f} MB",
            flush=True,
        )

    summary = uvloop.run(run_peer(config, on_record=show))
    print(json.dumps(summary), flush=True)
    return 0


def run_swarm_command(args: argparse.Namespace) -> int:
    from peer.net.swarm import run_swarm

    config = config_from_args(args, SwarmConfig)
    console = Console(stderr=True)
    with _progress(console) as progress:
        bar = progress.add_task("swarm", total=config.peers * config.rounds, status="")
        summary = run_swarm(config, on_progress=lambda done: progress.update(bar, completed=done))
    print(json.dumps(summary, indent=2))
    if summary["interrupted"]:
        return 130
    return 0 if not summary["failed_peers"] else 1


def run_status(args: argparse.Namespace) -> int:
    import asyncio

    from peer.net.status import swarm_status

    rows = asyncio.run(swarm_status(args.initial_peers, args.swarm, args.timeout))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"swarm {args.swarm!r}: {sum(r['state'] == 'live' for r in rows)} live peers")
    for column in ("peer", "round", "state", "age (s)", "addresses"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["peer"], str(row["round"]), row["state"], str(row["age_seconds"]), "\n".join(row["addresses"]))
    Console().print(table)
    return 0


COMMANDS = {"simulate": run_simulate, "run": run_run, "swarm": run_swarm_command, "status": run_status}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as error:
        print(f"peer {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"peer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
