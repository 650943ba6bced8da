"""The `peer` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import typing
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from gossip.protocols import protocol_named, registered
from peer.config import C, RunConfig, SimulationConfig, SwarmConfig, bootstrap_addresses, build_config, load_toml
from peer.curve import METRICS, X_AXES, Target
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


DISTRIBUTION = "gossip-peer"
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Settings about what a run writes and reports, whichever model declares them.
OUTPUT_SETTINGS = frozenset({
    "out", "overwrite", "plot", "eval_every", "eval_samples", "eval_peers", "target_accuracy", "target_loss",
    "stop_at_target",
    "metrics_port", "metrics_host", "checkpoint_every",
})
# The group of the settings that a command's own model declares (its others are common or a method's).
GROUP_OF_MODEL = {SimulationConfig: "simulation", RunConfig: "network", SwarmConfig: "network"}
# Groups of settings flags in --help, in this order: (title, description).
SETTINGS_GROUPS = {
    "common": ("common settings", "what every peer trains and how it gossips, whichever the method"),
    "method": (
        "method settings (each for the methods its help names)",
        "settings of some methods only (--algorithm); the other methods refuse them",
    ),
    "network": (
        "network settings",
        "real peers: their swarm, where they listen, how they find each other, who may join, how fast they go",
    ),
    "simulation": (
        "simulation settings",
        "the simulated swarm: its peers and their speeds, the emulated links, faults, attackers, the training engine",
    ),
    "output": (
        "output settings",
        "what the run writes and reports, and how often it evaluates",
    ),
}


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad flags get one line that names the problem, and exit code 2. A flag is only ever taken by
    its whole name: a prefix of a long one (--lo for --local-steps) is refused, not guessed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def version_line() -> str:
    try:
        return f"peer {metadata.version(DISTRIBUTION)}"
    except metadata.PackageNotFoundError:
        return f"peer (version unknown: the {DISTRIBUTION} distribution is not installed)"


def _flag_type(annotation: Any) -> tuple[Any, list[str] | None, str | None]:
    """argparse's type, choices and nargs for a settings field."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str, list(typing.get_args(annotation)), None
    if origin is list:
        return typing.get_args(annotation)[0], None, "*"
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return (args[0] if args else annotation), None, None


def method_settings() -> set[str]:
    """The settings that protocols bring of their own (``Protocol.own_settings``)."""
    return {name for protocol in registered() for name in protocol.own_settings}


def settings_group(model: type[BaseModel], name: str) -> str:
    """Which group of SETTINGS_GROUPS the setting ``name`` of ``model`` is shown in."""
    if name in OUTPUT_SETTINGS:
        return "output"
    if name in method_settings():
        return "method"
    declared_on = next((cls for cls in model.__mro__ if name in vars(cls).get("__annotations__", {})), None)
    return GROUP_OF_MODEL.get(declared_on, "common")


def add_config_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One flag per setting, in its group; unset flags stay absent so that a config file can supply them."""
    placed = {name: settings_group(model, name) for name, field in model.model_fields.items() if not field.exclude}
    groups = {
        key: parser.add_argument_group(title, description)
        for key, (title, description) in SETTINGS_GROUPS.items()
        if key in placed.values()
    }
    for name, key in placed.items():
        _add_setting_flag(groups[key], name, model.model_fields[name])
    parser.add_argument("--config", type=Path, default=None, help="TOML file with the same settings; flags win")


def _add_setting_flag(group: argparse._ArgumentGroup, name: str, field: Any) -> None:
    extra_help = {
        "topology": "one of " + ", ".join(TOPOLOGY_NAMES),
    }
    kind, choices, nargs = _flag_type(field.annotation)
    kind = FLAG_TYPES.get(name, kind)
    described = extra_help.get(name) or field.description or ""
    if kind is bool:
        group.add_argument(
            f"--{name.replace('_', '-')}", dest=name, action=argparse.BooleanOptionalAction,
            default=argparse.SUPPRESS, help=described,
        )
        return
    group.add_argument(
        f"--{name.replace('_', '-')}",
        dest=name,
        type=kind,
        choices=choices,
        nargs=nargs,
        default=argparse.SUPPRESS,
        help=f"{described} (default: {field.default})".strip(),
    )


def common_options() -> argparse.ArgumentParser:
    """The options of every command: the version, and how much it logs to stderr."""
    options = OneLineErrorParser(add_help=False)
    options.add_argument("--version", action="version", version=version_line())
    verbosity = options.add_mutually_exclusive_group()
    verbosity.add_argument(
        "--log-level", choices=LOG_LEVELS, default=None, help="log messages of this level and above (default: warning)"
    )
    verbosity.add_argument("-v", "--verbose", action="count", default=0, help="log more: -v info, -vv debug")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    return options


class SettingsCommand(typing.NamedTuple):
    """A command whose flags are the settings of ``model``."""

    name: str
    model: type[BaseModel]
    summary: str
    description: str


SETTINGS_COMMANDS = [
    SettingsCommand(
        "simulate", SimulationConfig, "simulate many peers in one process on a virtual network",
        description="Simulate a swarm of peers in one process: an emulated network, a virtual clock, real training; "
        "print a table of the results at the end.",
    ),
    SettingsCommand(
        "run", RunConfig, "run one peer on the network",
        description="Run one peer: join a swarm through its bootstrap peers (--initial-peers, --initial-peers-file or "
        "the environment variable PEER_INITIAL_PEERS) or start a new one, train and gossip for --rounds, then save "
        "and leave; Ctrl-C saves and leaves early.",
    ),
    SettingsCommand(
        "swarm", SwarmConfig, "run N real peer processes on this host over loopback",
        description="Start N peers as separate processes over loopback, the first bootstrapping the others; print "
        "the same table as peer simulate, with wall-clock times, and write the swarm's summary.json.",
    ),
    SettingsCommand(
        "doctor", RunConfig, "check that a peer with these flags can join its swarm, and say what to fix",
        description="Check, without training, whether a peer started with these same flags could join its swarm, "
        "and say what to fix where it could not.",
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="peer",
        description="Train a model by gossip between peers, without a server: simulate a swarm on one host, or run "
        "real peers that find each other through a DHT over libp2p.",
    )
    parser.add_argument("--version", action="version", version=version_line())
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    options = [common_options()]
    for name, model, summary, description in SETTINGS_COMMANDS:
        # The settings are many: the usage line points to the grouped list below it.
        add_config_flags(commands.add_parser(
            name, help=summary, description=description, parents=options, usage=f"peer {name} [FLAGS]",
        ), model)
    _add_status(commands.add_parser(
        "status", help="list the peers of a swarm", parents=options,
        description="List the peers that the DHT knows for a swarm (live ones, and those that left) with their "
        "rounds and accuracies.",
    ))
    keygen = commands.add_parser(
        "keygen", help="make a key for a private swarm", parents=options,
        description="Write a new random swarm key; give the file to every peer of the swarm with --swarm-key.",
    )
    keygen.add_argument("--out", type=Path, required=True, help="file to write (never overwritten); keep it secret")
    _add_plot(commands.add_parser(
        "plot", help="plot runs' learning curves, or a topology", parents=options,
        description="Overlay the learning curves of runs (folders written with --out), or draw a topology.",
    ))
    return parser


def _add_status(status: argparse.ArgumentParser) -> None:
    status.add_argument("--initial-peers", nargs="+", default=[], help="multiaddrs of any peer or DHT node of the swarm")
    status.add_argument(
        "--initial-peers-file", type=Path, default=None, metavar="FILE",
        help=RunConfig.model_fields["initial_peers_file"].description,
    )
    status.add_argument("--swarm", default="gossip", help="swarm name (default: gossip)")
    status.add_argument("--swarm-key", type=Path, default=None, help="the key of a private swarm (its peers are listed only with it)")
    status.add_argument("--allow-peers", type=Path, default=None, help="list only the peers in this file of peer ids")
    status.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the DHT (default: 30)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument(
        "--watch", type=float, default=None, metavar="S", help="refresh every S seconds until Ctrl-C (with --json: one line each)"
    )


def _add_plot(plot: argparse.ArgumentParser) -> None:
    plot.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR", help="run folders to overlay")
    plot.add_argument("--out", type=Path, required=True, help="image file to write (.png, .pdf or .svg)")
    plot.add_argument("--x", choices=X_AXES, default="round", help="x axis: rounds, bytes sent or time (default: round)")
    plot.add_argument(
        "--y", choices=list(METRICS), default="accuracy", help="y axis: mean test accuracy or mean test loss (default: accuracy)"
    )
    plot.add_argument("--log-x", action="store_true", help="a logarithmic x axis (bytes or time that span orders of magnitude)")
    plot.add_argument("--topology", help="draw this topology instead of runs (e.g. ring, torus, regular:4)")
    plot.add_argument("--peers", type=int, default=16, help="peers in the drawn topology (default: 16)")
    plot.add_argument("--weights", choices=["metropolis", "uniform"], default="metropolis", help="mixing weights for the spectral gap")
    plot.add_argument("--seed", type=int, default=0, help="seed of a random topology (default: 0)")


def logging_level(args: argparse.Namespace) -> int:
    """The level that --log-level, -v, -vv or -q asks for; warnings and errors by default."""
    if args.log_level:
        return LOG_LEVELS[args.log_level]
    if args.quiet:
        return logging.ERROR
    return {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)


class StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is when a record comes, not as it was when the handler was made
    (a caller that redirects stderr after main() still gets the messages)."""

    @property
    def stream(self) -> typing.TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _: typing.TextIO) -> None:
        pass


def configure_logging(level: int) -> None:
    """Log records of ``level`` and above to stderr, in one format."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StderrHandler)]:
        root.removeHandler(handler)  # main() run again in one process replaces its handler, never adds a second
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)


# Columns a terminal needs for a progress bar whose times are labelled (a peer's status included).
LABELLED_TIMES_WIDTH = 100


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        *_time_columns(console.width),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def _time_columns(width: int) -> list[ProgressColumn]:
    """The time elapsed and the estimated time left; labelled where the terminal has room for the words,
    which a narrower one would get by cutting every column short."""
    if width < LABELLED_TIMES_WIDTH:
        return [TimeElapsedColumn(), TimeRemainingColumn()]
    return [TimeElapsedColumn(), TextColumn("elapsed,"), TimeRemainingColumn(), TextColumn("left")]


# What the seconds to the target were counted on: the simulator's clock, or the wall clock of real peers.
CLOCKS = {"virtual_seconds_to_target": "simulated", "wall_seconds_to_target": "wall clock"}


def _summary_table(summary: dict[str, Any]) -> Table:
    """A run's result, from the figures its summary holds: a simulation's, or a swarm of real peers'."""
    table = Table(title=summary["label"], show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for key, value in _summary_rows(summary):
        table.add_row(key, value)
    return table


def _summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    protocol = protocol_named(summary["algorithm"])
    rows = [
        ("task / partition", f"{summary['task']} / {summary['partition']}"),
        ("peers / topology", f"{summary['peers']} / {protocol.describe_overlay(summary)}"),
        (f"{protocol.round_word} x local steps", f"{summary['rounds']} x {summary['local_steps']}"),
        ("codec / error feedback", f"{summary['codec']} / {summary['error_feedback']}"),
    ]
    rows += _fault_rows(summary) + _attacker_rows(summary)
    rows += _accuracy_rows(summary, protocol.final_label) + _speed_rows(summary)
    if summary.get("squared_error") is not None:
        rows.append(("squared error to the optimum", f"{summary['squared_error']:.4g}"))
    rows += protocol.table_rows(summary)
    if summary.get("consensus_distance") is not None:
        rows.append(("consensus distance", f"{summary['consensus_distance']:.4g}"))
    rows += [
        ("bytes sent, all peers", f"{summary['bytes_sent_total'] / 1e6:.2f} MB"),
        ("missed exchanges", str(summary["missed_exchanges_total"])),
    ]
    rows += _process_rows(summary) + _time_rows(summary)
    target = Target.of(summary)
    if target is not None:
        rows.append((f"to {target}", _to_target(summary)))
    return rows


def _fault_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    if summary.get("faults", "none") == "none":
        return []
    return [
        ("faults", f"{summary['faults']}; {summary['peers_up_at_end']} peers up at the end"),
        ("rounds completed", f"{summary['rounds_completed']}" + (" (stalled)" if summary["stalled"] else "")),
    ]


def _attacker_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    if not summary.get("attackers"):
        return []
    attackers = ", ".join(summary["attackers"])
    return [("attackers", f"{summary['byzantine']}: {attackers}; accuracy is the honest peers'")]


def _accuracy_rows(summary: dict[str, Any], final_label: str) -> list[tuple[str, str]]:
    if summary["mean_accuracy"] is None:
        return [("test accuracy", "no model was evaluated")]
    rows = [(f"test accuracy: {final_label}", f"{summary['mean_accuracy']:.4f}")]
    if summary["min_accuracy"] != summary["max_accuracy"]:
        rows.append(("test accuracy: min / max", f"{summary['min_accuracy']:.4f} / {summary['max_accuracy']:.4f}"))
    if summary.get("mean_loss") is not None:
        rows.append((f"test loss: {final_label}", f"{summary['mean_loss']:.4f}"))
    return rows


def _speed_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The accuracy of the slow peers and of the others, where the peers ran at different speeds."""
    if "slow_peers" in summary:  # a simulation names its slow peers
        if not summary["slow_peers"]:
            return []
        who = f"{len(summary['slow_peers'])} slow peers"
    elif summary.get("speeds", "same") != "same" and "mean_accuracy_slow" in summary:  # a swarm slows processes down
        who = "the slow peers"
    else:
        return []
    slow, fast = summary["mean_accuracy_slow"], summary["mean_accuracy_fast"]
    return [(f"speeds: {summary['speeds']}", f"{who} at {_accuracy(slow)}, the others at {_accuracy(fast)}")]


def _accuracy(value: float | None) -> str:
    return "(none evaluated)" if value is None else f"{value:.4f}"


def _process_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """How a swarm's peer processes ended; a simulation has none."""
    rows = []
    if "peers_finished" in summary:
        rows.append(("peers finished", f"{summary['peers_finished']} of {summary['peers']}"))
    if summary.get("failed_peers"):
        failed = ", ".join(f"{peer} (exit code {code})" for peer, code in summary["failed_peers"].items())
        rows.append(("failed peers", failed))
    if summary.get("interrupted"):
        rows.append(("interrupted", f"by Ctrl-C; {summary['rounds_completed']} rounds completed"))
    return rows


def _time_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    if "virtual_seconds" in summary:
        rows.append(("simulated time", f"{summary['virtual_seconds']:.1f} s"))
    rows.append(("wall time", f"{summary['wall_seconds']:.1f} s"))
    if "engine" in summary:
        threads = summary["threads"]
        rows.append(("training engine", f"{summary['engine']}, {threads} thread{'s' if threads != 1 else ''}"))
    return rows


def _to_target(summary: dict[str, Any]) -> str:
    if summary["rounds_to_target"] is None:
        return "not reached"
    rounds = summary["rounds_to_target"]
    key = next(key for key in CLOCKS if key in summary)
    return (
        f"after {rounds} round{'s' if rounds != 1 else ''}, {summary['bytes_to_target'] / 1e6:.2f} MB, "
        f"{summary[key]:.1f} s {CLOCKS[key]}"
    )


def config_from_args(args: argparse.Namespace, model: type[C]) -> C:
    """The settings of a command: defaults, then --config's file, then the flags given."""
    flags = {name: value for name, value in vars(args).items() if name in model.model_fields}
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

        # The curve of the run's target: its loss where it was given --target-loss.
        y = "loss" if config.target_loss is not None else "accuracy"
        plot_runs([load_run(config.out)], config.out / "run.png", y=y)
        Console().print(f"plot: {config.out / 'run.png'}")
    return 0


def run_run(args: argparse.Namespace) -> int:
    import uvloop

    from peer.net.node import run_peer

    config = config_from_args(args, RunConfig)

    def show(record: RoundRecord) -> None:
        accuracy = "" if record.accuracy is None else f"  accuracy {record.accuracy:.4f}"
        if record.loss is not None:
            accuracy += f"  loss {record.loss:.4f}"
        print(
            f"round {record.round + 1}/{config.rounds}{accuracy}  neighbours {record.neighbours_heard}/"
            f"{record.neighbours_expected}  sent {record.bytes_sent / 1e6:.1f} MB",
            flush=True,
        )

    summary = uvloop.run(run_peer(config, on_record=show))
    # The peer has saved and left; a late Ctrl-C would only turn its exit into a death by signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    print(json.dumps(summary), flush=True)
    return 0


def run_swarm_command(args: argparse.Namespace) -> int:
    from peer.net.swarm import run_swarm

    config = config_from_args(args, SwarmConfig)
    console = Console(stderr=True)
    with _progress(console) as progress:
        bar = progress.add_task("swarm", total=config.peers * config.rounds, status="")
        summary = run_swarm(config, on_progress=lambda done: progress.update(bar, completed=done))
    Console().print(_summary_table(summary))
    folder = summary.get("out") or config.out  # run_swarm picks a folder when --out is not given
    if folder:
        print(f"summary: {Path(folder) / 'summary.json'}", flush=True)  # whole, whatever the terminal's width
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
    for column in ("peer", "round", "accuracy", "loss", "state", "age (s)", "addresses"):
        table.add_column(column)
    for row in status["peers"]:
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        loss = "-" if row.get("loss") is None else f"{row['loss']:.4f}"
        table.add_row(
            row["peer"], str(row["round"]), accuracy, loss, row["state"], str(row["age_seconds"]),
            "\n".join(row["addresses"]),
        )
    return table


def _status_bootstrap(args: argparse.Namespace) -> list[str]:
    """--initial-peers, --initial-peers-file's and the environment's addresses, each once."""
    try:
        return bootstrap_addresses(args.initial_peers, args.initial_peers_file)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def run_status(args: argparse.Namespace) -> int:
    import asyncio

    from peer.net.access import access_from
    from peer.net.status import connect, swarm_status

    if args.watch is not None and not args.watch > 0:
        raise ConfigError(f"--watch {args.watch:g}: give a number of seconds above 0")
    addresses = _status_bootstrap(args)
    access = access_from(args.swarm_key, args.allow_peers)
    dht = connect(addresses, args.timeout)
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


def run_doctor_command(args: argparse.Namespace) -> int:
    config = config_from_args(args, RunConfig)
    from peer.net.doctor import run_doctor  # hivemind is imported only when a command needs it

    return run_doctor(config)


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
        plot_runs([load_run(folder) for folder in args.runs], args.out, args.x, y=args.y, log_x=args.log_x)
    else:
        raise ConfigError("give one or more run folders (written with --out), or --topology SPEC")
    print(f"wrote {args.out}")
    return 0


COMMANDS = {
    "simulate": run_simulate,
    "run": run_run,
    "swarm": run_swarm_command,
    "doctor": run_doctor_command,
    "status": run_status,
    "keygen": run_keygen,
    "plot": run_plot,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(logging_level(args))
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
