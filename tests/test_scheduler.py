"""Who trains which run: every bad interleaving forced at a known step (a hook in the worker,
a held lock), never left to timing."""

import json
import os
import signal
import subprocess
import sys
import time

from normexp import rundir
from normexp import sweep as sweep_lib
from normexp.locks import RunLock

from conftest import ROOT, tiny_base, write_sweep

# Loaded by every Python process of a test's sweep (PYTHONPATH): in a worker, at a run's step,
# it does one thing once (the marker file says it has, and by which process).
HOOK = '''
import os, signal, time
if os.environ.get("HOOK_RUN") and os.environ.get("NORMEXP_WORKER"):
    from normexp import tracking
    victim, at = os.environ["HOOK_RUN"], int(os.environ["HOOK_STEP"])
    action, marker = os.environ["HOOK_ACTION"], os.environ["HOOK_MARKER"]
    log = tracking.Tracker.log
    def hooked(self, step, metrics):
        log(self, step, metrics)
        if victim in self.path and step == at and "loss" in metrics and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            if action == "kill-self":
                os.kill(os.getpid(), signal.SIGKILL)
            stop = signal.getsignal(signal.SIGTERM).__self__  # the worker's StopRequests
            os.kill(os.getppid(), signal.SIGTERM if action == "term-parent" else signal.SIGKILL)
            while stop.signum is None:  # until the stop reaches this worker, at this step
                time.sleep(0.05)
    tracking.Tracker.log = hooked
'''


def sweep_with_hook(tmp_path, action, run, step, *args, lrs=(1e-3, 2e-3, 3e-3)):
    """`normexp sweep` of three tiny runs with the hook armed; returns (process, sweep)."""
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    path = write_sweep(tmp_path, grid={"optim.lr": list(lrs)}, base=tiny_base())
    env = {**os.environ, "PYTHONPATH": f"{hook_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HOOK_RUN": run, "HOOK_STEP": str(step), "HOOK_ACTION": action,
           "HOOK_MARKER": str(tmp_path / "marker")}
    done = subprocess.run([sys.executable, "-m", "normexp.cli", "sweep", path, *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    return done, sweep_lib.load(path)


def statuses(sweep):
    return {r.name: rundir.status(r.cfg.run.dir) for r in sweep.runs}


def test_a_killed_worker_is_named_and_its_run_taken_over(tmp_path):
    done, sweep = sweep_with_hook(tmp_path, "kill-self", "lr=0.002", 6, "--max-parallel", "2")
    assert done.returncode == 0, done.stderr
    pid = (tmp_path / "marker").read_text()
    assert f"(pid {pid}) died (killed by SIGKILL) while training lr=0.002; another worker " \
           f"takes it over" in done.stderr
    assert set(statuses(sweep).values()) == {"completed"}
    summary = rundir.read_summary(os.path.join(sweep.out_dir, "lr=0.002"))
    assert summary.history == ({"status": "failed", "steps": 0,  # no checkpoint yet
                                "error": f"RuntimeError: its sweep worker (pid {pid}) died, "
                                         f"killed by SIGKILL"},)
    steps = [m["step"] for m in rundir.read_metrics(os.path.join(sweep.out_dir, "lr=0.002"))]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # resumed, each step logged once
    assert done.stderr.strip().splitlines()[-1].startswith("results:")
    assert "sweep: 3 of 3 runs finished (3 completed)" in done.stderr


def test_sigterm_to_the_parent_stops_every_worker(tmp_path):
    done, sweep = sweep_with_hook(tmp_path, "term-parent", "lr=0.001", 4, "--max-parallel", "2")
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    runs = statuses(sweep)
    assert runs["lr=0.001"] == "interrupted", done.stderr
    # the workers stopped with their parent: none goes on training (or holds) a run, and a
    # run that did not end by itself was interrupted
    assert not any(RunLock.of(r.cfg.run.dir).held() for r in sweep.runs)
    assert set(runs.values()) <= {"interrupted", "completed", "pending"}
    assert "results:" not in done.stderr
    assert "sweep: " in done.stderr.strip().splitlines()[-1]
    assert "\r" not in done.stderr  # off a terminal: plain lines


def test_workers_die_with_their_parent(tmp_path):
    done, sweep = sweep_with_hook(tmp_path, "kill-parent", "lr=0.001", 4, "--max-parallel", "2")
    assert done.returncode == -signal.SIGKILL
    worker = int((tmp_path / "marker").read_text())
    deadline = time.monotonic() + 120  # the kernel's SIGTERM: the run checkpoints and stops
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(worker)
    assert rundir.status(os.path.join(sweep.out_dir, "lr=0.001")) == "interrupted", (
        done.stderr, rundir.read_summary(os.path.join(sweep.out_dir, "lr=0.001")),
        os.listdir(os.path.join(sweep.out_dir, "lr=0.001")), worker,
        rundir.read_metrics(os.path.join(sweep.out_dir, "lr=0.001"))[-2:])
    assert rundir.read_summary(os.path.join(sweep.out_dir, "lr=0.001")).signal == "SIGTERM"


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_a_signal_after_a_runs_last_step_still_stops_the_sweep(tmp_path, monkeypatch, capsys):
    from normexp import train
    sweep = sweep_lib.load(write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3]},
                                       base=tiny_base("train.steps=2")))
    finish = train._finish

    def finish_then_signal(*args, **kwargs):  # the final evaluation and summary
        finish(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "_finish", finish_then_signal)
    assert sweep_lib.run(sweep, progress=False) == 128 + signal.SIGTERM
    assert statuses(sweep) == {"lr=0.001": "completed", "lr=0.002": "pending"}
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "sweep: 1 of 2 runs finished (1 completed); 1 not: lr=0.002")


def test_a_run_held_by_another_process_is_waited_for_then_the_sweep_ends(tmp_path):
    path = write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3]}, base=tiny_base("train.steps=2"))
    sweep = sweep_lib.load(path)
    held = RunLock(sweep.out_dir, "lr=0.001")
    assert held.acquire()
    env = {**os.environ, "NORMEXP_POLL_SECONDS": "0.2"}
    proc = subprocess.Popen([sys.executable, "-m", "normexp.cli", "sweep", path], cwd=ROOT,
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:  # until the sweep says whom it waits for
            lines.append(line)
            if line.startswith("waiting for"):
                break
        assert lines[-1].startswith(f"waiting for {held.holder()}, which trains lr=0.001")
        assert rundir.status(os.path.join(sweep.out_dir, "lr=0.002")) == "completed"
        held.release()
        rest = proc.stderr.read()
        assert proc.wait(timeout=300) == 0, rest
    finally:
        proc.kill()
        held.release()
    assert "sweep: 2 of 2 runs finished (2 completed)" in rest
    assert set(statuses(sweep).values()) == {"completed"}


def test_train_resume_beside_a_holder_is_refused_and_touches_nothing(tmp_path):
    from conftest import normexp, tiny_args
    out = tmp_path / "run"
    assert normexp("train", *tiny_args(out), "train.steps=4").returncode == 0
    before = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
    held = RunLock.of(str(out))
    assert held.acquire()
    try:
        again = normexp("train", str(out / "config.yaml"), "--resume")
        fresh = normexp("train", *tiny_args(out), "train.steps=4", "--overwrite")
    finally:
        held.release()
    for done in (again, fresh):
        assert done.returncode == 75, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert f"{out}: being trained by {socket_host()} pid {os.getpid()}" in done.stderr
    assert {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)} == before


def socket_host():
    import socket
    return socket.gethostname()


def test_an_edited_sweep_file_is_refused_between_shards(tmp_path):
    from normexp.errors import UsageError
    import pytest
    path = write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3]}, seeds=2)
    first = sweep_lib.claim_directory(sweep_lib.load(path))  # shard 1 starts
    write_sweep(tmp_path, grid={"optim.lr": [5e-4, 1e-3, 2e-3]}, seeds=2)  # an lr in front
    from conftest import normexp
    dry = normexp("sweep", path, "--dry-run", "--shard", "2/2")  # as shard 2 would see it
    assert dry.returncode == 2 and "2 run(s) added" in dry.stderr, dry.stderr
    with pytest.raises(UsageError, match=r"sweep.json: .* no longer gives the runs this sweep "
                                         r"directory was made for: 2 run\(s\) added "
                                         r"\(lr=0.0005,seed=0, lr=0.0005,seed=1\)"):
        sweep_lib.claim_directory(sweep_lib.load(path))
    write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3]}, seeds=2,
                base=tiny_base("train.steps=5"))
    with pytest.raises(UsageError, match="the base config differs in train.steps"):
        sweep_lib.claim_directory(sweep_lib.load(path))
    write_sweep(tmp_path, grid={"optim.lr": [2e-3, 1e-3]}, seeds=2)  # reordered: same runs
    again = sweep_lib.claim_directory(sweep_lib.load(path))
    assert [r.name for r in again.runs] == [r.name for r in first.runs]  # in the first order
    manifest = json.load(open(os.path.join(first.out_dir, "sweep.json")))
    assert [r["name"] for r in manifest["runs"]] == [r.name for r in first.runs]
