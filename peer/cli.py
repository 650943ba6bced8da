"""The `peer` command line."""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from peer.config import ConfigError, SimulationConfig, build_config, load_toml
from peer.metrics import RoundRecord
from peer.tasks import PartitionError, TaskError
from topology import TOPOLOGY_NAMES, TopologyError

USER_ERRORS = (ConfigError, TaskError, PartitionError, TopologyError)


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad flags get one line that names the problem, and exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _flag_type(annotation: Any) -> tuple[Any, list[str] | None]:
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation))
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return (args[0] if args else annotation), None


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; unset flags stay absent so that a config file can supply them."""
    extra_help = {
        "topology": "one of " + ", ".join(TOPOLOGY_NAMES),
    }
    for name, field in SimulationConfig.model_fields.items():
        kind, choices = _flag_type(field.annotation)
        described = extra_help.get(name) or field.description or ""
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=kind,
            choices=choices,
            default=argparse.SUPPRESS,
            help=f"{described} (default: {field.default})".strip(),
        )
    parser.add_argument("--config", type=Path, default=None, help="TOML file with the same settings; flags win")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="peer", description="Peer-to-peer gossip training.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    simulate = commands.add_parser(
        "simulate",
        help="simulate many peers in one process on a virtual network",
        description="Simulate a swarm of peers on one host: an emulated network, a virtual clock, real training.",
    )
    add_config_flags(simulate)
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


def run_simulate(args: argparse.Namespace) -> int:
    from peer.simulate import simulate  # torch is imported only when a command needs it

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    config = build_config(load_toml(args.config) if args.config else {}, flags)
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_simulate(args)
    except USER_ERRORS as error:
        print(f"peer {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"peer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
