"""`peer run --resume` without a checkpoint to resume from: one-line errors (a killed peer that
resumes and finishes with its swarm is tested with the swarm's churn in test_network)."""

import pytest

from peer.checkpoint import FILE
from tests.test_network import FAST, run


@pytest.mark.parametrize(
    "prepare, message",
    [
        (lambda out: None, "there is no checkpoint in"),
        (lambda out: (out / FILE).write_bytes(b"\x00" * 40), "damaged or cut short"),
    ],
    ids=["none", "truncated"],
)
def test_resume_without_a_usable_checkpoint_is_a_one_line_error(tmp_path, prepare, message):
    out = tmp_path / "out"
    out.mkdir()
    prepare(out)
    code, _, err = run(["run", "--resume", "--out", str(out), *FAST], timeout=120)
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_resume_needs_an_out_folder():
    code, _, err = run(["run", "--resume", *FAST], timeout=60)
    assert code == 2 and "--resume needs --out" in err
