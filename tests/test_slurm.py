"""normexp's SLURM launches against a running scheduler (`make test-slurm` brings up a one-node
cluster with scripts/slurm_cluster.sh): nothing here sets SLURM's variables by hand. Skipped,
with the reason, where no scheduler answers."""

import json
import os
import shutil
import subprocess

import pytest

from conftest import ROOT, TINY, tiny_base, write_sweep

pytestmark = pytest.mark.slurm


def _answers():
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:  # a controller configured but not answering
        return False


@pytest.fixture(autouse=True, scope="module")
def scheduler():
    """Asked only when a test here runs (`make test` deselects them): sinfo takes seconds to
    give up on a controller that is down."""
    if not _answers():
        pytest.skip("no SLURM scheduler answers (sinfo); make test-slurm starts one")


def sbatch(tmp_path, *args):
    """Submit from the repository root and wait for the job; returns the CompletedProcess."""
    return subprocess.run(["sbatch", "--wait", "--cpus-per-task=1", "--mem=2G",
                           f"--output={tmp_path}/slurm-%A_%a.out", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def task_outputs(tmp_path):
    return {name: (tmp_path / name).read_text() for name in sorted(os.listdir(tmp_path))
            if name.startswith("slurm-")}


def test_an_array_sweep_trains_every_run_once_and_a_resubmission_nothing(tmp_path):
    out = tmp_path / "sweep"
    path = write_sweep(tmp_path, grid={"optim.lr": [1e-3, 3e-3]}, seeds=2, out_dir=str(out),
                       base=tiny_base("train.steps=6"))
    done = sbatch(tmp_path, "--array=1-2", "scripts/slurm_sweep.sh", path)
    assert done.returncode == 0, (done.stderr, task_outputs(tmp_path))
    runs = [d for d in sorted(os.listdir(out)) if os.path.isfile(out / d / "summary.json")]
    assert len(runs) == 4
    first = {}
    for run in runs:
        summary = json.loads((out / run / "summary.json").read_text())
        assert summary["status"] == "completed" and not summary.get("history"), run
        lines = (out / run / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(line)["step"] for line in lines]
        assert steps == sorted(set(steps)), run  # each step logged once: trained once
        first[run] = os.path.getmtime(out / run / "summary.json")
    assert (out / "results.csv").is_file()
    outputs = task_outputs(tmp_path)
    assert len(outputs) == 2 and all("\r" not in text for text in outputs.values()), outputs
    # the same array again: every run is finished, so nothing is trained or rewritten
    again = sbatch(tmp_path, "--array=1-2", "scripts/slurm_sweep.sh", path)
    assert again.returncode == 0, again.stderr
    assert {run: os.path.getmtime(out / run / "summary.json") for run in runs} == first


def test_a_two_task_srun_trains_as_one_process_on_two_devices(tmp_path):
    """`srun -n 2` of `normexp train` with NORMEXP_DISTRIBUTED=1: jax finds the job from SLURM;
    the losses and gradient norms equal one process over the same global batch of 2 devices."""
    from test_parallel import assert_close, records
    args = [*TINY, "log.every=1", "train.steps=8"]
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    single = subprocess.run([os.path.join(ROOT, ".venv", "bin", "normexp"), "train", *args,
                             f"run.out_dir={tmp_path / 'single'}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    job = subprocess.run(["srun", "-n", "2", "--cpus-per-task=1", "--mem=2G",
                          "--kill-on-bad-exit=1", "env", "NORMEXP_DISTRIBUTED=1",
                          ".venv/bin/normexp", "train", *args,
                          f"run.out_dir={tmp_path / 'job'}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert job.returncode == 0, job.stderr
    assert_close(records(tmp_path / "single"), records(tmp_path / "job"))
    summary = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["devices"] == 2
    assert job.stdout.count(": completed") == 1, job.stdout  # process 0's end line alone
    shards = os.listdir(tmp_path / "job" / "checkpoints" / "8" / "default")
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(shards)
