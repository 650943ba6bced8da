"""The command line: the happy path, config files, and one-line errors with exit code 2 for bad input."""

import subprocess
import sys

import pytest

from peer.cli import main
from peer.config import SimulationConfig

FAST = ["--peers", "3", "--rounds", "2", "--local-steps", "1", "--partition", "iid"]


def run_cli(capsys, *args):
    code = main(["simulate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_simulate_prints_a_table_and_writes_files(capsys, tmp_path):
    code, out, _ = run_cli(capsys, *FAST, "--out", str(tmp_path))
    assert code == 0
    assert "test accuracy: mean" in out
    assert (tmp_path / "summary.json").exists() and (tmp_path / "metrics.jsonl").exists()


def test_a_target_accuracy_shows_in_the_table_and_the_summary(capsys, tmp_path):
    code, out, _ = run_cli(capsys, *FAST, "--target-accuracy", "0.01", "--out", str(tmp_path), "--plot")
    assert code == 0
    assert "to mean accuracy 0.01" in out and "after 1 round," in out and "plot:" in out
    import json

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds_to_target"] == 1 and summary["virtual_seconds_to_target"] > 0
    assert (tmp_path / "run.png").read_bytes().startswith(b"\x89PNG")


def test_a_target_loss_shows_in_the_table_and_the_summary_and_plot_draws_the_loss(capsys, tmp_path, monkeypatch):
    import peer.plot

    drawn, plot_runs = [], peer.plot.plot_runs

    def plot(runs, out, **options):
        drawn.append(options)
        plot_runs(runs, out, **options)

    monkeypatch.setattr(peer.plot, "plot_runs", plot)
    # An untrained mnist1d model's loss is near ln 10 = 2.3, so 2.5 is reached at once.
    code, out, _ = run_cli(capsys, *FAST, "--target-loss", "2.5", "--out", str(tmp_path), "--plot")
    assert code == 0 and drawn == [{"y": "loss"}]
    assert "to mean loss 2.5" in out and "after 1 round," in out and "to mean accuracy" not in out
    import json

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["target_loss"] == 2.5 and summary["target_accuracy"] is None
    assert summary["rounds_to_target"] == 1 and summary["virtual_seconds_to_target"] > 0
    assert (tmp_path / "run.png").read_bytes().startswith(b"\x89PNG")


def test_config_file_supplies_settings_and_flags_win(capsys, tmp_path):
    (tmp_path / "run.toml").write_text('peers = 5\nrounds = 1\nlocal-steps = 1\npartition = "iid"\ntopology = "complete"\n')
    code, _, _ = run_cli(capsys, "--config", str(tmp_path / "run.toml"), "--peers", "3", "--out", str(tmp_path / "o"))
    assert code == 0
    import json

    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["peers"] == 3  # the flag
    assert summary["topology"] == "complete"  # the file


BAD_INPUTS = {
    "unknown topology": (["--topology", "hypercube"], "topology"),
    "unknown task": (["--task", "imagenet"], "task"),
    "disconnected graph": (["--topology", "erdos:0.01", "--peers", "12"], "disconnected"),
    "no peer": (["--peers", "0"], "--peers: Input should be greater than or equal to 1"),
    "one peer with faults": (["--peers", "1", "--faults", "crash:0.5@1"], "--faults: --peers 1 trains one peer alone"),
    "missing data directory": (["--task", "fashion-mnist", "--data-dir", "/nonexistent/data"], "--data-dir"),
    "dirichlet alpha zero": (["--partition", "dirichlet:0"], "alpha"),
    "dirichlet alpha negative": (["--partition", "dirichlet:-1"], "alpha"),
    "unknown partition": (["--partition", "zipf"], "partition"),
    "bad user task": (["--task", "no_such_module:task"], "module"),
    "unknown codec": (["--codec", "zstd"], "--codec: bad codec spec 'zstd': unknown codec"),
    "top-k ratio zero": (["--codec", "topk:0"], "outside (0, 1]"),
    "top-k ratio above one": (["--codec", "topk:1.5"], "outside (0, 1]"),
    "random-k ratio not a number": (["--codec", "randk:half"], "not a decimal number"),
    "bad error feedback": (["--error-feedback", "econtrol:2"], "--error-feedback"),
    "consensus step above one": (["--consensus-step", "2"], "--consensus-step"),
    "unknown schedule": (["--lr-schedule", "linear"], "--lr-schedule: bad schedule"),
    "unknown mixing": (["--mixing", "geometric-median"], "--mixing: bad mixing"),
    "unknown variance target": (["--mixing", "variance-corrected:everyone"], "bad variance target"),
    "variance correction with error feedback": (["--mixing", "variance-corrected", "--codec", "int8"], "--error-feedback none"),
    "no gossip steps": (["--gossip-steps", "0"], "--gossip-steps"),
    "negative sam radius": (["--algorithm", "dfedsam", "--sam-rho", "-0.1"], "--sam-rho"),
    "schedule start of one": (["--lr-schedule", "cosine:1"], "--lr-schedule: bad schedule"),
    "target accuracy zero": (["--target-accuracy", "0"], "--target-accuracy: Input should be greater than 0"),
    "target accuracy above one": (["--target-accuracy", "1.5"], "--target-accuracy: Input should be less than or equal to 1"),
    "plot without out": (["--plot"], "--plot writes OUT/run.png: give --out DIR too"),
    "out under a file": (["--out", "/dev/null/run"], "--out /dev/null/run cannot be written"),
    "unknown speeds": (["--speeds", "turbo"], "unknown --speeds 'turbo'"),
    "straggler factor zero": (["--speeds", "stragglers:0.5:0"], "slowdown must be > 0"),
    "speeds file missing": (["--speeds", "file:/no/such/speeds.txt"], "cannot be read"),
    "negative staleness exponent": (["--algorithm", "async-gossip", "--staleness", "poly:-1"], "must be a number >= 0"),
    "adaptive steps with rounds": (["--local-steps", "adaptive:4"], "only for --algorithm async-gossip"),
    "local steps not a number": (["--local-steps", "many"], "--local-steps"),
    "no threads": (["--threads", "0"], "--threads"),
    # A flag the chosen method does not use is refused, never ignored.
    "sam radius with plain gossip": (["--algorithm", "dpsgd", "--sam-rho", "0.1"], "--sam-rho: only for --algorithm dfedsam or async-gossip; dpsgd does not use it"),
    "a topology with sampling": (["--algorithm", "modest", "--topology", "star"], "--topology: only for --algorithm dpsgd, dfedsam, srrw, async-gossip or diloco; modest does not use it"),
    "gossip steps with sampling": (["--algorithm", "modest", "--gossip-steps", "3"], "--gossip-steps: only for --algorithm dpsgd or dfedsam; modest does not use it"),
    "error feedback with a token": (["--algorithm", "srrw", "--error-feedback", "choco"], "--error-feedback: only for --algorithm dpsgd, dfedsam or diloco; srrw does not use it"),
    "tokens with plain gossip": (["--tokens", "2"], "--tokens: only for --algorithm srrw; dpsgd does not use it"),
    "alpha with plain gossip": (["--alpha", "2"], "--alpha: only for --algorithm srrw; dpsgd does not use it"),
    "a sample with plain gossip": (["--sample-size", "3"], "--sample-size: only for --algorithm modest or fedavg; dpsgd does not use it"),
    "aggregators with plain gossip": (["--aggregators", "2"], "--aggregators: only for --algorithm modest; dpsgd does not use it"),
    "a consensus step without error feedback": (["--consensus-step", "0.5"], "--consensus-step is CHOCO's step, which only error feedback takes"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_code_2(capsys, case):
    args, keyword = BAD_INPUTS[case]
    code, _, err = run_cli(capsys, *FAST, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert keyword.lower() in err.lower()
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args, keyword",
    [
        (["--algorithm", "sgd"], "algorithm"),
        (["--rounds", "many"], "rounds"),
        (["--device", "tpu"], "device"),
        (["--init", "random"], "--init"),
        (["--engine", "vectorised"], "--engine"),
    ],
)
def test_bad_flags_are_one_line_and_exit_code_2(capsys, args, keyword):
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert keyword in err


@pytest.mark.parametrize(
    "content, keyword",
    [
        ("peers = [", "TOML"),
        ("peers = 4\nwarp_speed = 9\n", "warp_speed"),
        ('rounds = "ten"\n', "rounds"),
    ],
)
def test_malformed_config_file_is_one_line_and_exit_code_2(capsys, tmp_path, content, keyword):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    code, _, err = run_cli(capsys, "--config", str(path))
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert keyword in err


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--config", str(tmp_path / "absent.toml"))
    assert code == 2 and "does not exist" in err


@pytest.mark.network
def test_console_script_reports_errors_without_a_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "peer.cli", "simulate", "--topology", "nope"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "command, keyword",
    [
        (["run", "--shard", "3", "--shards", "2"], "--shard 3 must be below --shards 2"),
        (["swarm", "--algorithm", "fedavg"], "peer simulate` only"),
        (["status"], "needs --initial-peers"),
        (["run", "--codec", "topk:-1"], "--codec: bad codec spec"),
        (["swarm", "--error-feedback", "ef21"], "--error-feedback"),
        (["swarm", "--peers", "4", "--metrics-port", "65533"], "--metrics-port 65533 leaves no port"),
        (["swarm", "--out", "/dev/null/swarm"], "--out /dev/null/swarm cannot be written"),
        (["run", "--out", "/dev/null/peer"], "--out /dev/null/peer cannot be written"),
        (["run", "--metrics-port", "70000"], "--metrics-port"),
        (["run", "--slowdown", "0.5"], "--slowdown"),
        (["swarm", "--speeds", "stragglers:0.5:4+jitter:0.1"], "leave out +jitter"),
        (["status", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--watch", "0"], "--watch 0: give a number of seconds"),
    ],
)
def test_network_commands_check_their_settings_first(capsys, command, keyword):
    code = main(command)
    err = capsys.readouterr().err
    assert code == 2 and keyword in err and len(err.strip().splitlines()) == 1


def test_fedavg_with_a_lossy_codec_sends_compressed_uploads():
    from peer.simulate import simulate

    settings = {"algorithm": "fedavg", "peers": 4, "rounds": 2, "local_steps": 2, "partition": "iid"}
    plain = simulate(SimulationConfig(**settings)).summary
    compressed = simulate(SimulationConfig(**settings, codec="int8")).summary
    assert compressed["codec"] == "int8"
    # Uploads (half of the traffic) shrink to about a quarter; the global model goes out whole.
    assert 0.55 < compressed["bytes_sent_total"] / plain["bytes_sent_total"] < 0.7
    assert compressed["mean_accuracy"] > 0.1


def test_a_peer_on_every_interface_announces_its_other_addresses_and_the_loopback_only_when_alone():
    from peer.config import RunConfig

    visible = ["/ip4/127.0.0.1/tcp/5", "/ip4/10.0.0.2/tcp/5"]
    assert RunConfig(host="0.0.0.0").announced(visible) == ["/ip4/10.0.0.2/tcp/5"]
    assert RunConfig(host="0.0.0.0").announced(visible[:1]) == visible[:1]
    assert RunConfig().announced(visible) == visible  # on the loopback: what it listens on
    assert RunConfig(host="0.0.0.0", announce_maddrs=["/ip4/203.0.113.5/tcp/5"]).announced(visible) == visible
