"""`peer run --resume` without a usable checkpoint: one-line errors, exit 2, before anything starts
(a killed peer that resumes and finishes with its swarm is tested with the swarm's churn in test_network)."""

import pytest

from peer.checkpoint import FILE
from peer.cli import main


@pytest.mark.parametrize(
    "prepare, message",
    [
        (lambda out: None, "there is no checkpoint in"),
        (lambda out: (out / FILE).write_bytes(b"\x00" * 40), "damaged or cut short"),
    ],
    ids=["none", "truncated"],
)
def test_resume_without_a_usable_checkpoint_is_a_one_line_error(tmp_path, capsys, prepare, message):
    out = tmp_path / "out"
    out.mkdir()
    prepare(out)
    assert main(["run", "--resume", "--out", str(out), "--rounds", "3"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_resume_and_checkpoints_need_an_out_folder(capsys):
    assert main(["run", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
    assert main(["run", "--checkpoint-every", "5"]) == 2
    assert "--checkpoint-every needs --out" in capsys.readouterr().err


def test_client_mode_needs_a_peer_to_dial(capsys):
    assert main(["run", "--client-mode"]) == 2
    assert "--client-mode needs --initial-peers" in capsys.readouterr().err
