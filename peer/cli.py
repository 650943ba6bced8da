"""The `peer` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gossip.protocols import protocol_named
from peer.config import C, RunConfig, SimulationConfig, SwarmConfig, build_config, load_toml
from peer.curve import X_AXES
from peer.errors import ConfigError
from peer.metrics import RoundRecord
from peer.runs import RunError, load_run
from peer.tasks import PartitionError, TaskError
from topology import TOPOLOGY_NAMES, TopologyError

USER_ERRORS = (ConfigError, TaskError, PartitionError, TopologyError, RunError)


def _algorithm(name: str) -> str:
    try:
        protocol_named(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


# Flags that take a spec besides their field's type: the settings parse it (--local-steps adaptive:H).
FLAG_TYPES = {"local_steps": str, "algorithm": _algorithm}


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
        if field.exclude:  # set through another flag
            continue
        kind, choices, nargs = _flag_type(field.annotation)
        kind = FLAG_TYPES.get(name, kind)
        described = extra_help.get(name) or field.description or ""
        if kind is bool:
            parser.add_argument(
                f"--{name.replace('_', '-')}", dest=name, action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS, help=described,
            )
            continue
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
    status.add_argument("--swarm-key", type=Path, default=None, help="the key of a private swarm (its peers are listed only with it)")
    status.add_argument("--allow-peers", type=Path, default=None, help="list only the peers in this file of peer ids")
    status.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the DHT (default: 30)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument(
        "--watch", type=float, default=None, metavar="S", help="refresh every S seconds until Ctrl-C (with --json: one line each)"
    )
    keygen = commands.add_parser(
        "keygen", help="make a key for a private swarm",
        description="Write a new random swarm key; give the file to every peer of the swarm with --swarm-key.",
    )
    keygen.add_argument("--out", type=Path, required=True, help="file to write (never overwritten); keep it secret")
    plot = commands.add_parser(
        "plot", help="plot runs' learning curves, or a topology",
        description="Overlay the learning curves of runs (folders written with --out), or draw a topology.",
    )
    plot.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR", help="run folders to overlay")
    plot.add_argument("--out", type=Path, required=True, help="image file to write (.png, .pdf or .svg)")
    plot.add_argument("--x", choices=X_AXES, default="round", help="x axis: rounds, bytes sent or time (default: round)")
    plot.add_argument("--log-x", action="store_true", help="a logarithmic x axis (bytes or time that span orders of magnitude)")
    plot.add_argument("--topology", help="draw this topology instead of runs (e.g. ring, torus, regular:4)")
    plot.add_argument("--peers", type=int, default=16, help="peers in the drawn topology (default: 16)")
    plot.add_argument("--weights", choices=["metropolis", "uniform"], default="metropolis", help="mixing weights for the spectral gap")
    plot.add_argument("--seed", type=int, default=0, help="seed of a random topology (default: 0)")
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
    protocol = protocol_named(summary["algorithm"])
    table = Table(title=summary["label"], show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    rows = [
        ("task / partition", f"{summary['task']} / {summary['partition']}"),
        ("peers / topology", f"{summary['peers']} / {protocol.describe_overlay(summary)}"),
        (f"{protocol.round_word} x local steps", f"{summary['rounds']} x {summary['local_steps']}"),
        ("codec / error feedback", f"{summary['codec']} / {summary['error_feedback']}"),
    ]
    if summary["faults"] != "none":
        rows.append(("faults", f"{summary['faults']}; {summary['peers_up_at_end']} peers up at the end"))
        rows.append(("rounds completed", f"{summary['rounds_completed']}" + (" (stalled)" if summary["stalled"] else "")))
    if summary["attackers"]:
        attackers = ", ".join(summary["attackers"])
        rows.append(("attackers", f"{summary['byzantine']}: {attackers}; accuracy is the honest peers'"))
    rows += _accuracy_rows(summary, protocol.final_label)
    if summary["slow_peers"]:
        slow, fast = summary["mean_accuracy_slow"], summary["mean_accuracy_fast"]
        rows.append((
            f"speeds: {summary['speeds']}",
            f"{len(summary['slow_peers'])} slow peers at {_accuracy(slow)}, the others at {_accuracy(fast)}",
        ))
    if summary["squared_error"] is not None:
        rows.append(("squared error to the optimum", f"{summary['squared_error']:.4g}"))
    rows += protocol.table_rows(summary)
    if summary["consensus_distance"] is not None:
        rows.append(("consensus distance", f"{summary['consensus_distance']:.4g}"))
    rows += [
        ("bytes sent, all peers", f"{summary['bytes_sent_total'] / 1e6:.2f} MB"),
        ("missed exchanges", str(summary["missed_exchanges_total"])),
        ("simulated time", f"{summary['virtual_seconds']:.1f} s"),
        ("wall time", f"{summary['wall_seconds']:.1f} s"),
        ("training engine", f"{summary['engine']}, {summary['threads']} thread{'s' if summary['threads'] != 1 else ''}"),
    ]
    if summary["target_accuracy"] is not None:
        rows.append((f"to mean accuracy {summary['target_accuracy']:g}", _to_target(summary)))
    for key, value in rows:
        table.add_row(key, value)
    return table


def _accuracy_rows(summary: dict[str, Any], final_label: str) -> list[tuple[str, str]]:
    if summary["mean_accuracy"] is None:
        return [("test accuracy", "no model was evaluated")]
    rows = [(f"test accuracy: {final_label}", f"{summary['mean_accuracy']:.4f}")]
    if summary["min_accuracy"] != summary["max_accuracy"]:
        rows.append(("test accuracy: min / max", f"{summary['min_accuracy']:.4f} / {summary['max_accuracy']:.4f}"))
    return rows


def _accuracy(value: float | None) -> str:
    return "(none evaluated)" if value is None else f"{value:.4f}"


def _to_target(summary: dict[str, Any]) -> str:
    if summary["rounds_to_target"] is None:
        return "not reached"
    rounds = summary["rounds_to_target"]
    return (
        f"after {rounds} round{'s' if rounds != 1 else ''}, {summary['bytes_to_target'] / 1e6:.2f} MB, "
        f"{summary['virtual_seconds_to_target']:.1f} s simulated"
    )


def config_from_args(args: argparse.Namespace, model: type[C]) -> C:
    """The settings of a command: defaults, then --config's file, then the flags given."""
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    return build_config(model, load_toml(args.config) if args.config else {}, flags)


def run_simulate(args: argparse.Namespace) -> int:
    from peer.simulate import simulate  # torch is imported only when a command needs it

    config = config_from_args(args, SimulationConfig)
    console = Console(stderr=True)
    # A round is one record per honest peer, unless it ends in one model (an aggregate, a token's visit).
    per_peer = not config.protocol.one_model
    honest = config.peers - (config.attack.count(config.peers) if config.attack else 0)
    with _progress(console) as progress:
        bar = progress.add_task("simulating", total=config.rounds * (honest if per_peer else 1), status="")

        def advance(record: RoundRecord) -> None:
            status = f"round {record.round + 1}/{config.rounds}"
            if record.accuracy is not None:
                status += f"  {record.peer} acc {record.accuracy:.3f}"
            if per_peer:
                progress.update(bar, advance=1, status=status)
            else:
                progress.update(bar, completed=record.round + 1, status=status)

        result = simulate(config, on_record=advance)
    Console().print(_summary_table(result.summary))
    if config.out:
        Console().print(f"metrics: {config.out / 'metrics.jsonl'}   summary: {config.out / 'summary.json'}")
    if config.plot:
        from peer.plot import plot_runs  # matplotlib is imported only when a plot is asked for

        plot_runs([load_run(config.out)], config.out / "run.png")
        Console().print(f"plot: {config.out / 'run.png'}")
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


def _status_table(status: dict[str, Any]) -> Table:
    summary = status["summary"]
    line = f"swarm {status['swarm']!r}: {summary['live_peers']} live peers"
    if summary["live_peers"]:
        line += (
            f", round slowest {summary['slowest_round']} / median {summary['median_round']}"
            f" / fastest {summary['fastest_round']}"
        )
    table = Table(title=line)
    for column in ("peer", "round", "accuracy", "state", "age (s)", "addresses"):
        table.add_column(column)
    for row in status["peers"]:
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        table.add_row(
            row["peer"], str(row["round"]), accuracy, row["state"], str(row["age_seconds"]), "\n".join(row["addresses"])
        )
    return table


def run_status(args: argparse.Namespace) -> int:
    import asyncio

    from peer.net.access import access_from
    from peer.net.status import connect, swarm_status

    if args.watch is not None and not args.watch > 0:
        raise ConfigError(f"--watch {args.watch:g}: give a number of seconds above 0")
    access = access_from(args.swarm_key, args.allow_peers)
    dht = connect(args.initial_peers, args.timeout)
    console = Console()

    async def show() -> None:
        # Ctrl-C (the way to end --watch) lets a refresh in flight finish instead of cutting
        # the DHT client off mid-request.
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        while not stop.is_set():
            status = await swarm_status(dht, args.swarm, args.timeout, access)
            if args.json:
                print(json.dumps(status, indent=None if args.watch else 2), flush=True)
            else:
                if args.watch and console.is_terminal:
                    console.clear()
                console.print(_status_table(status))
            if args.watch is None:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.watch)

    try:
        asyncio.run(show())
    finally:
        dht.shutdown()
    return 0


def run_keygen(args: argparse.Namespace) -> int:
    from peer.net.access import generate_swarm_key

    generate_swarm_key(args.out)
    print(f"wrote a swarm key to {args.out}; give it to every peer of the swarm with --swarm-key {args.out}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from peer.plot import plot_runs, plot_topology

    if args.topology and args.runs:
        raise ConfigError("give run folders or --topology, not both")
    if args.topology:
        if args.peers < 2:
            raise ConfigError(f"--peers {args.peers}: a topology needs at least 2 peers")
        plot_topology(args.topology, args.peers, args.out, weights=args.weights, seed=args.seed)
    elif args.runs:
        plot_runs([load_run(folder) for folder in args.runs], args.out, args.x, log_x=args.log_x)
    else:
        raise ConfigError("give one or more run folders (written with --out), or --topology SPEC")
    print(f"wrote {args.out}")
    return 0


COMMANDS = {"simulate": run_simulate, "run": run_run, "swarm": run_swarm_command, "status": run_status, "keygen": run_keygen, "plot": run_plot}


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
