import json
import os
import stat
import subprocess
import sys

import pytest

from normexp import rundir
from normexp.train import run

from conftest import ROOT, cli_in_process, tiny_args

WRITE = """
import os, sys
os.umask(int(sys.argv[1], 8))
from normexp.rundir import write_atomic
write_atomic(sys.argv[2], "x")
write_atomic(sys.argv[2], b"y")  # replacing keeps the mode
assert os.umask(0) == int(sys.argv[1], 8), "write_atomic must leave the umask as it was"
"""


def test_existing_run_dir_is_never_replaced_silently(tiny, tmp_path):
    out = tmp_path / "run"
    run(tiny("train.steps=2"))
    before = (out / "metrics.jsonl").read_text()
    again = cli_in_process("train", *tiny_args(out), "train.steps=2")
    assert again.returncode == 2 and "--resume" in again.stderr and "--overwrite" in again.stderr
    assert (out / "metrics.jsonl").read_text() == before
    other = cli_in_process("train", *tiny_args(out), "train.steps=2", "optim.lr=1e-2",
                           "--resume")
    assert other.returncode == 2 and "optim.lr" in other.stderr
    done = cli_in_process("train", str(out / "config.yaml"), "--resume")
    assert done.returncode == 0 and "nothing to do" in done.stderr
    replaced = cli_in_process("train", *tiny_args(out), "train.steps=3", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_resume_with_no_run_to_resume_is_an_error(tmp_path):
    out = tmp_path / "run"
    result = cli_in_process("train", *tiny_args(out), "--resume")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"no run at {out} to resume; drop --resume to start it" in result.stderr
    assert not out.exists()


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path):
    precious = tmp_path / "run"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    result = cli_in_process("train", *tiny_args(precious), "--overwrite")
    assert result.returncode == 2 and "not a normexp run" in result.stderr
    assert (precious / "thesis.tex").read_text() == "years of work"
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = cli_in_process("train", *tiny_args(afile))
    assert result.returncode == 2 and "is a file" in result.stderr


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    path = tmp_path / "summary.json"
    # A fresh interpreter: the umask is read once per process, at the first write.
    subprocess.run([sys.executable, "-c", WRITE, oct(umask), str(path)], cwd=ROOT, check=True)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    assert path.read_text() == "y" and os.listdir(tmp_path) == ["summary.json"]


def test_status_reads_the_directory_and_a_failure_is_recorded_in_the_summary(tmp_path):
    run_dir = str(tmp_path / "run")
    assert rundir.status(run_dir) == rundir.PENDING
    os.makedirs(run_dir)
    assert rundir.status(run_dir) == rundir.STARTED
    assert rundir.record_failure(run_dir, ValueError("boom")).status == rundir.FAILED
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))  # not a run: no config
    (tmp_path / "run" / "config.yaml").write_text("run:\n  name: x\n")
    rundir.record_failure(run_dir, ValueError("boom"))
    summary = rundir.read_summary(run_dir)
    assert summary.status == rundir.status(run_dir) == rundir.FAILED
    assert summary.error == "ValueError: boom"
    assert rundir.read_config(run_dir)["run.name"] == "x"
    assert set(rundir.FINISHED) < set(rundir.STATUSES)
    # a run that had trained and been resumed before: its steps and history are kept
    earlier = [{"status": "interrupted", "steps": 4, "signal": "SIGTERM"}]
    rundir.write_summary(run_dir, rundir.Summary("running", steps=4, history=tuple(earlier)))
    rundir.record_failure(run_dir, RuntimeError("worker died"))
    assert rundir.read_summary(run_dir) == rundir.Summary(
        "failed", steps=4, history=tuple(earlier), error="RuntimeError: worker died",
        run_dir=os.path.abspath(run_dir))


def test_metrics_lines_write_nan_as_null_and_a_truncated_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [rundir.metrics_line(0, {"loss": 2.5, "grad_norm": float("nan")}),
             rundir.metrics_line(1, {"loss": float("inf")})]
    assert json.loads(lines[0]) == {"step": 0, "loss": 2.5, "grad_norm": None}
    path.write_text("\n".join(lines) + "\n" + lines[0][:9])  # a writer killed mid-line
    assert [r["step"] for r in rundir.read_metrics(str(path))] == [0, 1]
    assert rundir.read_metrics(str(tmp_path)) == rundir.read_metrics(str(path))  # the run dir
    rundir.write_metrics(str(path), rundir.read_metrics(str(path))[:1])
    assert path.read_text() == json.dumps({"step": 0, "loss": 2.5, "grad_norm": None}) + "\n"
    assert rundir.read_metrics(str(tmp_path / "missing.jsonl")) == []


def test_an_older_runs_config_reads_in_todays_spelling(tmp_path):
    """A run from before model.qk_norm took names says `qk_norm: true`; it reads as per_head,
    so it groups with today's per_head runs."""
    (tmp_path / rundir.CONFIG).write_text("model:\n  qk_norm: true\n  n_layer: 2\n"
                                          "optim:\n  lr: 0.001\n")
    flat = rundir.read_config(str(tmp_path))
    assert flat == {"model.qk_norm": "per_head", "model.n_layer": 2, "optim.lr": 0.001}
