"""normexp's SLURM launches against a running scheduler (`make test-slurm` brings up a one-node
cluster with scripts/slurm_cluster.sh): nothing here sets SLURM's variables by hand. Skipped,
with the reason, where no scheduler answers."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import ROOT, TINY, normexp, tiny_base, write_sweep
from test_parallel import assert_close, records

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


def wait_for(path, job, timeout=300):
    """Wait until `path` exists, while `job` (a Popen) still runs."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert job.poll() is None, f"the job ended before {path} appeared: {job.communicate()}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def submit(tmp_path, *args):
    """sbatch without waiting; returns the job id."""
    done = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", "--mem=2G",
                           f"--output={tmp_path}/slurm-%A_%a.out", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def queued(job_id):
    """Whether the job is still in the queue (pending or running; the test cluster keeps no
    accounting, so an ended job is simply gone)."""
    done = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                          text=True, timeout=60)
    return bool(done.stdout.strip())


def test_a_cancelled_array_task_resumes_from_its_checkpoint_when_resubmitted(tmp_path):
    """scancel of a running task: its run stops at a checkpoint (SLURM sends SIGTERM first);
    the same array resubmitted continues it from there to the uninterrupted run's metrics."""
    out = tmp_path / "sweep"
    path = write_sweep(tmp_path, seeds=1, out_dir=str(out), base=tiny_base(
        "train.steps=3000", "train.checkpoint_every=100", "train.eval_every=1000",
        "log.every=50"))
    job_id = submit(tmp_path, "--array=1-1", "scripts/slurm_sweep.sh", path)
    deadline = time.monotonic() + 300
    while not list(out.glob("*/checkpoints/100")):
        assert time.monotonic() < deadline and queued(job_id), task_outputs(tmp_path)
        time.sleep(0.2)
    subprocess.run(["scancel", job_id], check=True, timeout=60)
    deadline = time.monotonic() + 120
    while queued(job_id):  # until the task has ended and let go of its run
        assert time.monotonic() < deadline, task_outputs(tmp_path)
        time.sleep(0.2)
    (run_dir,) = [d for d in out.iterdir() if (d / "config.yaml").is_file()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM", summary
    assert 100 <= summary["steps"] < 3000
    done = sbatch(tmp_path, "--array=1-1", "scripts/slurm_sweep.sh", path)
    assert done.returncode == 0, (done.stderr, task_outputs(tmp_path))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    (attempt,) = summary["history"]
    assert attempt["status"] == "interrupted" and summary["resumed_at"] == attempt["steps"]
    # the uninterrupted run, the same sweep trained here in one go
    reference = normexp("sweep", path, "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr
    assert records(run_dir) == records(tmp_path / "reference" / run_dir.name)


ARGS = [*TINY, "log.every=10", "train.steps=200", "train.checkpoint_every=50",
        "train.eval_every=100"]


LAUNCHED = []  # the names of the srun jobs a test started


@pytest.fixture(autouse=True)
def cancel_leftovers():
    """A test that fails leaves no job running behind it."""
    yield
    while LAUNCHED:
        subprocess.run(["scancel", "-n", LAUNCHED.pop()], timeout=60)


def job_name(out):
    return f"normexp-test-{os.getpid()}-{abs(hash(str(out)))}"


def srun(out, *extra):
    """`srun -n 2` of `normexp train ARGS` with NORMEXP_DISTRIBUTED=1, named after `out`
    (`job_name`), each line of output headed by its task's number; returns the Popen. With
    --kill-on-bad-exit=0 (a cluster's slurm.conf may set KillOnBadExit=1), a task that dies
    leaves the other to end by itself."""
    LAUNCHED.append(job_name(out))
    return subprocess.Popen(["srun", "-n", "2", "--cpus-per-task=1", "--mem=2G", "--label",
                             "--kill-on-bad-exit=0", f"--job-name={job_name(out)}",
                             "env", "NORMEXP_DISTRIBUTED=1", ".venv/bin/normexp", "train", *ARGS,
                             f"run.out_dir={out}", *extra], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 2-task job trained in one go: (its run directory, srun's stdout)."""
    out = tmp_path_factory.mktemp("srun") / "job"
    job = srun(out)
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr
    return out, stdout


def test_a_two_task_srun_trains_as_one_process_on_two_devices(tmp_path, uninterrupted):
    """`srun -n 2` of `normexp train` with NORMEXP_DISTRIBUTED=1: jax finds the job from SLURM;
    the losses and gradient norms equal one process over the same global batch of 2 devices."""
    job, stdout = uninterrupted
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    single = subprocess.run([os.path.join(ROOT, ".venv", "bin", "normexp"), "train", *ARGS,
                             f"run.out_dir={tmp_path / 'single'}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    assert_close(records(tmp_path / "single"), records(job))
    summary = json.loads((job / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["devices"] == 2
    ends = [line for line in stdout.splitlines() if ": completed" in line]
    assert len(ends) == 1 and ends[0].startswith("0: "), stdout  # process 0's end line alone
    shards = os.listdir(job / "checkpoints" / "200" / "default")
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(shards)


def job_of(out):
    """The SLURM job id of the running srun that trains into `out`."""
    done = subprocess.run(["squeue", "-h", "-n", job_name(out), "-o", "%i"],
                          capture_output=True, text=True, timeout=60)
    (job_id,) = done.stdout.split()
    return job_id


def test_a_cancelled_two_task_job_resumes_to_the_uninterrupted_run(tmp_path, uninterrupted):
    out = tmp_path / "job"
    job = srun(out)
    wait_for(out / "checkpoints" / "50", job)
    subprocess.run(["scancel", job_of(out)], check=True, timeout=60)
    job.communicate(timeout=120)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM", summary
    assert 50 <= summary["steps"] < 200
    resumed = srun(out, "--resume")
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    assert records(out) == records(uninterrupted[0])


def test_a_killed_task_leaves_the_other_to_record_the_run_and_end(tmp_path, uninterrupted):
    """SIGKILL to task 1's process (a lost host): task 0 ends within seconds with one line,
    the record says interrupted, and the whole job resumed equals the uninterrupted run."""
    out = tmp_path / "job"
    job = srun(out)
    # between checkpoints: a process lost while the other waits in a save's barrier is noticed
    # only by jax's heartbeat timeout (README, Several devices and several hosts)
    wait_for(out / "checkpoints" / "50", job)
    pids = subprocess.run(["scontrol", "listpids", job_of(out)], capture_output=True,
                          text=True, timeout=60, check=True).stdout.splitlines()[1:]
    # PID JOBID STEPID LOCALID GLOBALID: the task whose global id is 1
    (pid,) = [int(p.split()[0]) for p in pids if p.split()[-1] == "1"
              and p.split()[2] not in ("batch", "extern", "-")]
    deadline = time.monotonic() + 60
    while max(r["step"] for r in records(out)) < 60:
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    stdout, stderr = job.communicate(timeout=120)
    assert time.monotonic() - killed < 30, "task 0 did not end promptly"
    assert job.returncode != 0
    errors = [line for line in stderr.splitlines() if "normexp" in line]
    assert len(errors) == 1 and errors[0].startswith("0: normexp: error: process 0: this "
                                                     "2-process job lost a process"), stderr
    assert "relaunch the whole job with --resume" in errors[0] and "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "lost a process" in summary["error"]
    assert summary["steps"] == 50
    resumed = srun(out, "--resume")
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    assert records(out) == records(uninterrupted[0])
