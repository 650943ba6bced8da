"""The command line's options: the version, logging, whole flag names only, grouped help, the doctor,
status's bootstrap file, and a user's task that fails."""

import logging
import re
import sys
import types
from importlib import metadata

import pytest

from gossip.protocols import registered
from peer.cli import SETTINGS_GROUPS, StderrHandler, build_parser, main, settings_group
from peer.config import RunConfig, SimulationConfig, SwarmConfig
from peer.errors import ConfigError

FAST = ["--peers", "3", "--rounds", "2", "--local-steps", "1", "--partition", "iid"]
# Settings that are refused before anything runs: a command that ends at once, with exit code 2.
REFUSED = ["--peers", "0"]


def exit_code(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


# --- the version ----------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--version"], ["simulate", "--version"], ["status", "--version"]])
def test_version_prints_the_installed_distributions_version(capsys, argv):
    assert exit_code(argv) == 0
    assert capsys.readouterr().out == f"peer {metadata.version('gossip-peer')}\n"


# --- logging --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, level",
    [
        ([], logging.WARNING),
        (["-v"], logging.INFO),
        (["-vv"], logging.DEBUG),
        (["-vvv"], logging.DEBUG),
        (["-q"], logging.ERROR),
        (["--log-level", "debug"], logging.DEBUG),
        (["--log-level", "info"], logging.INFO),
        (["--log-level", "warning"], logging.WARNING),
        (["--log-level", "error"], logging.ERROR),
    ],
)
def test_the_log_flags_set_the_root_loggers_level(capsys, flags, level):
    assert main(["simulate", *flags, *REFUSED]) == 2
    assert logging.getLogger().level == level


def test_log_records_go_to_stderr_in_one_format_from_the_chosen_level_up(capsys):
    main(["simulate", "-v", *REFUSED])
    capsys.readouterr()
    logging.getLogger("peer.example").debug("not shown")
    logging.getLogger("peer.example").info("shown")
    err = capsys.readouterr().err
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO peer\.example: shown\n", err), err


def test_main_run_twice_in_one_process_keeps_one_handler_of_its_own(capsys):
    main(["simulate", *REFUSED])
    main(["simulate", "-q", *REFUSED])
    assert sum(isinstance(handler, StderrHandler) for handler in logging.getLogger().handlers) == 1


@pytest.mark.parametrize("flags", [["-q", "-v"], ["--log-level", "info", "-q"]])
def test_log_flags_that_contradict_each_other_are_refused(capsys, flags):
    assert exit_code(["simulate", *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not allowed with argument" in err


def test_an_unknown_log_level_is_refused(capsys):
    assert exit_code(["run", "--log-level", "verbose"]) == 2
    assert "argument --log-level: invalid choice: 'verbose'" in capsys.readouterr().err


# --- whole flag names only -------------------------------------------------------------------


def test_a_prefix_of_a_flag_is_refused_rather_than_taken_for_the_flag(capsys):
    assert exit_code(["simulate", "--lo", "3"]) == 2
    assert capsys.readouterr().err == "peer: error: unrecognized arguments: --lo 3 (see --help)\n"


def test_no_parser_of_any_command_accepts_abbreviations():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"simulate", "run", "swarm", "doctor", "status", "keygen", "plot"}
    assert [parser.allow_abbrev, *(command.allow_abbrev for command in commands.values())] == [False] * 8


# --- grouped help ----------------------------------------------------------------------------


def help_sections(capsys, command):
    """``peer COMMAND --help`` as {section title: its text}, in order."""
    assert exit_code([command, "--help"]) == 0
    parts = re.split(r"^(\S[^\n]*):\n", capsys.readouterr().out, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def flags_in(section):
    return re.findall(r"^  (--[a-z-]+)", section, flags=re.MULTILINE)


TITLES = {key: title for key, (title, _) in SETTINGS_GROUPS.items()}


@pytest.mark.parametrize(
    "command, groups",
    [
        ("simulate", ["common", "method", "simulation", "output"]),
        ("run", ["common", "method", "network", "output"]),
        ("swarm", ["common", "method", "network", "output"]),
        ("doctor", ["common", "method", "network", "output"]),
    ],
)
def test_help_shows_the_settings_in_groups_each_with_a_description(capsys, command, groups):
    sections = help_sections(capsys, command)
    assert list(sections) == ["options", *(TITLES[group] for group in groups)]
    for group in groups:
        text = " ".join(sections[TITLES[group]].split())
        assert text.startswith(SETTINGS_GROUPS[group][1] + " --"), text
    assert "--config" in flags_in(sections["options"]) and "--log-level" in flags_in(sections["options"])


def test_every_setting_of_a_command_has_one_flag_in_one_group(capsys):
    sections = help_sections(capsys, "simulate")
    flags = [flag for title in TITLES.values() for flag in flags_in(sections.get(title, ""))]
    expected = [f"--{name.replace('_', '-')}" for name, field in SimulationConfig.model_fields.items() if not field.exclude]
    assert sorted(flags) == sorted(expected)


def test_help_puts_flags_where_the_settings_model_declares_them(capsys):
    simulate, doctor = help_sections(capsys, "simulate"), help_sections(capsys, "doctor")
    assert {"--topology", "--codec", "--rounds"} <= set(flags_in(simulate[TITLES["common"]]))
    assert {"--sam-rho", "--tokens", "--staleness"} <= set(flags_in(simulate[TITLES["method"]]))
    assert {"--link-loss", "--faults", "--peers"} <= set(flags_in(simulate[TITLES["simulation"]]))
    assert {"--out", "--plot", "--target-accuracy"} <= set(flags_in(simulate[TITLES["output"]]))
    assert {"--initial-peers", "--initial-peers-file", "--swarm-key"} <= set(flags_in(doctor[TITLES["network"]]))
    assert {"--metrics-port", "--checkpoint-every"} <= set(flags_in(doctor[TITLES["output"]]))


@pytest.mark.parametrize(
    "model, name, group",
    [
        (SimulationConfig, "topology", "common"),
        (SimulationConfig, "duration", "common"),
        (SimulationConfig, "sam_rho", "method"),
        (SimulationConfig, "speeds", "simulation"),
        (SimulationConfig, "threads", "simulation"),  # declared anew for the simulator's engines
        (SimulationConfig, "stop_at_target", "output"),
        (RunConfig, "threads", "common"),
        (RunConfig, "initial_peers", "network"),
        (RunConfig, "resume", "network"),
        (RunConfig, "metrics_host", "output"),
        (SwarmConfig, "speeds", "network"),
        (SwarmConfig, "client_peers", "network"),
        (SwarmConfig, "metrics_port", "output"),
        (SwarmConfig, "eval_every", "output"),
    ],
)
def test_a_settings_group_follows_where_the_setting_is_declared(model, name, group):
    assert settings_group(model, name) == group


def test_every_protocols_own_settings_are_method_settings():
    own = {name for protocol in registered() for name in protocol.own_settings}
    assert own and {settings_group(SimulationConfig, name) for name in own} == {"method"}


# --- doctor ------------------------------------------------------------------------------------


def test_doctor_builds_the_settings_of_peer_run_and_returns_what_the_check_says(monkeypatch):
    checked = []
    doctor = types.ModuleType("peer.net.doctor")
    doctor.run_doctor = lambda config: checked.append(config) or 3
    monkeypatch.setitem(sys.modules, "peer.net.doctor", doctor)
    assert main(["doctor", "--swarm", "lab", "--port", "31337"]) == 3
    assert [(type(config), config.swarm, config.port) for config in checked] == [(RunConfig, "lab", 31337)]


def test_doctor_refuses_bad_settings_as_peer_run_does(capsys):
    assert main(["doctor", "--shard", "3", "--shards", "2"]) == 2
    assert capsys.readouterr().err == "peer doctor: error: --shard 3 must be below --shards 2\n"


# --- status's bootstrap peers -------------------------------------------------------------------

FLAG_PEER = "/ip4/127.0.0.1/tcp/1/p2p/QmFlag"
FILE_PEER = "/ip4/127.0.0.1/tcp/2/p2p/QmFile"
ENV_PEER = "/ip4/127.0.0.1/tcp/3/p2p/QmEnv"


def test_status_joins_through_the_flags_the_file_and_the_environment(monkeypatch, tmp_path, capsys):
    import peer.net.status

    dialled = []

    def connect(addresses, timeout):
        dialled.append(addresses)
        raise ConfigError("no swarm in a test")

    monkeypatch.setattr(peer.net.status, "connect", connect)
    monkeypatch.setenv("PEER_INITIAL_PEERS", ENV_PEER)
    (tmp_path / "peers.txt").write_text(f"# the lab's peers\n{FILE_PEER} {FLAG_PEER}\n")
    code = main(["status", "--initial-peers", FLAG_PEER, "--initial-peers-file", str(tmp_path / "peers.txt")])
    assert code == 2 and dialled == [[FLAG_PEER, FILE_PEER, ENV_PEER]]
    assert capsys.readouterr().err == "peer status: error: no swarm in a test\n"


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "--initial-peers-file {file}: cannot be read (No such file or directory)"),
        ("/ip4/127.0.0.1/tcp/2\n", "bootstrap address '/ip4/127.0.0.1/tcp/2' is not a multiaddr of a peer"),
    ],
)
def test_a_bad_bootstrap_file_for_status_is_one_line(monkeypatch, tmp_path, capsys, content, message):
    monkeypatch.delenv("PEER_INITIAL_PEERS", raising=False)
    file = tmp_path / "peers.txt"
    if content is not None:
        file.write_text(content)
    assert main(["status", "--initial-peers-file", str(file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peer status: error: " + message.format(file=file)) and err.count("\n") == 1, err


# --- a user's task that fails ----------------------------------------------------------------------

TASK_MODULE = "tasks_written_by_a_test"


@pytest.fixture
def task_module(tmp_path, monkeypatch):
    """Writes the module of a user's tasks, importable for this test only."""

    def write(source):
        (tmp_path / f"{TASK_MODULE}.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))

    yield write
    sys.modules.pop(TASK_MODULE, None)


CONTRACT = "def FUNCTION(data_dir: Path | None) -> peer.tasks.Task"


@pytest.mark.parametrize(
    "source, message",
    [
        ("def make_task(data_dir):\n    raise ValueError('boom')\n", "task {spec} raised ValueError: boom"),
        ("def make_task(data_dir):\n    raise KeyError('images')\n", "task {spec} raised KeyError: 'images'"),
        ("def make_task(data_dir):\n    raise RuntimeError('two\\nlines')\n", "task {spec} raised RuntimeError: two lines"),
        ("def make_task(data_dir):\n    raise NotImplementedError\n", "task {spec} raised NotImplementedError"),
        ("def make_task(data_dir):\n    return {'x': 1}\n", "task {spec} returned dict, but it must be " + CONTRACT),
        ("raise OSError('no disk')\n", "task {spec}: importing {module} raised OSError: no disk"),
        (
            "import a_module_nobody_installed\n",
            (
                "cannot import task module '{module}' (No module named 'a_module_nobody_installed'): "
                "put it on PYTHONPATH or run from its folder"
            ),
        ),
    ],
    ids=["raises", "raises-key-error", "multi-line-message", "no-message", "returns-a-dict", "import-raises", "import-error"],
)
def test_a_users_task_that_fails_is_one_line_naming_the_task_and_the_exception(capsys, task_module, source, message):
    task_module(source)
    spec = f"{TASK_MODULE}:make_task"
    assert main(["simulate", *FAST, "--task", spec]) == 2
    expected = message.format(spec=spec, module=TASK_MODULE)
    assert capsys.readouterr().err == f"peer simulate: error: {expected}\n"
