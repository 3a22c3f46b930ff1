import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, TINY, cli_in_process
from normexp.errors import EXIT_LOST

# Runs in a fresh interpreter: the host platform's device count is fixed when jax starts.
SCRIPT = '''
import json, sys
import jax
from normexp.config import load
from normexp.errors import UsageError
from normexp.rundir import read_metrics
from normexp.train import run, run_group
tiny, out = json.loads(sys.argv[1]), sys.argv[2]
result = {"devices": jax.device_count()}
def cfg(name, *extra):
    # one checkpoint, at the end: what is compared here is the training, not its saves
    return load(None, tiny + [f"run.out_dir={out}/{name}", "train.checkpoint_every=12", *extra])
for kind in ("layernorm", "batchnorm"):
    for mode in ("off", "auto"):
        name = f"{kind}-{mode}"
        summary = run(cfg(name, f"model.norm.kind={kind}", f"train.data_parallel={mode}"))
        result[name] = {"devices": summary.devices,
                        "metrics": read_metrics(f"{out}/{name}/metrics.jsonl")}
group = run_group([cfg(f"group{s}", f"run.seed={s}") for s in (0, 1)])
result["group"] = [s.devices for s in group]
from normexp import budget  # a group too large for one device: each member's batch splits
budget.devices_needed = lambda cfg, vocab, runs, available: available
group = run_group([cfg(f"wide{s}", f"run.seed={s}") for s in (0, 1)])
result["wide"] = [s.devices for s in group]
result["wide1"] = read_metrics(f"{out}/wide1/metrics.jsonl")
single = run(cfg("seed1", "run.seed=1", "train.data_parallel=off"))
result["group1"] = read_metrics(f"{out}/group1/metrics.jsonl")
result["seed1"] = read_metrics(f"{out}/seed1/metrics.jsonl")
try:
    run(cfg("odd", "train.batch_size=6"))
except UsageError as e:
    result["odd"] = str(e)
print(json.dumps(result))
'''


def test_data_parallel_over_four_devices_equals_one_device(tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(TINY), str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["devices"] == 4
    for kind in ("layernorm", "batchnorm"):  # batch statistics pool over the global batch
        one, four = result[f"{kind}-off"], result[f"{kind}-auto"]
        assert (one["devices"], four["devices"]) == (1, 4)
        # Under BatchNorm the biases feeding a norm have a zero gradient up to rounding, which
        # Adam scales up to lr-sized steps: the running means (so val losses) follow that noise.
        assert_close(one["metrics"], four["metrics"],
                     val_rtol=1e-4 if kind == "layernorm" else 1e-3)
    assert result["group"] == [1, 1]  # a small group fills one device before another is used
    assert result["wide"] == [4, 4]
    assert_close(result["seed1"], result["group1"])
    assert_close(result["seed1"], result["wide1"])
    assert result["odd"].startswith("train.batch_size: 6 sequences do not split evenly over 4 "
                                    "devices")


def assert_close(a, b, val_rtol=1e-4):
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        for key, rtol in (("loss", 1e-4), ("grad_norm", 1e-4), ("val_loss", val_rtol)):
            if key in ra:
                np.testing.assert_allclose(ra[key], rb[key], rtol=rtol, err_msg=key)


# --- several processes: one job of 2 processes x 1 CPU device on this machine ---------------

def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out, *extra, kill=None, processes=2, env=None):
    """Start `normexp train` as one job of `processes` processes on 127.0.0.1; returns them.
    kill=(process id, step, signal name): that process sends itself the signal once it has
    logged that step."""
    from test_train import KILLER
    port = free_port()
    children = []
    for i in range(processes):
        cmd = ["train", *TINY, "log.every=1", "train.steps=8", f"run.out_dir={out}", *extra]
        if kill and kill[0] == i:
            cmd = ["-c", KILLER, str(kill[1]), kill[2], *cmd]
        else:
            cmd = ["-m", "normexp.cli", *cmd]
        child_env = dict(os.environ, NORMEXP_DISTRIBUTED="1", JAX_NUM_PROCESSES=str(processes),
                         JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_PROCESS_ID=str(i))
        child_env.update(env or {})
        children.append(subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=child_env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True))
    return children


def finish(children, timeout=240, outputs=None):
    """[(exit code, stderr)] of each process, after all have ended; their stdout appended to
    `outputs` where given."""
    results = []
    for child in children:
        out, err = child.communicate(timeout=timeout)
        results.append((child.returncode, err))
        if outputs is not None:
            outputs.append(out)
    return results


def records(run_dir):
    from normexp.rundir import read_metrics
    return read_metrics(os.path.join(run_dir, "metrics.jsonl"))


def test_two_processes_train_as_one_job_stop_together_and_resume(tmp_path):
    # the same global batch on one process with two devices
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    single = subprocess.run([sys.executable, "-m", "normexp.cli", "train", *TINY, "log.every=1",
                             "train.steps=8", f"run.out_dir={tmp_path / 'single'}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    reference = tmp_path / "reference"
    outputs = []
    results = finish(launch(reference), outputs=outputs)
    assert [code for code, _ in results] == [0, 0], results
    # the end line once, from process 0
    assert [out.count(": completed") for out in outputs] == [1, 0], outputs
    assert_close(records(tmp_path / "single"), records(reference))
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["devices"] == 2
    lines = (reference / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(9))  # written once
    shards = os.listdir(reference / "checkpoints" / "8" / "default")
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(shards)  # each process its shard
    from normexp.checkpoint import damage
    assert damage(reference / "checkpoints" / "8") is None

    # SIGTERM reaches process 1 alone: both stop at the same step, one checkpoint, interrupted
    stopped = tmp_path / "stopped"
    results = finish(launch(stopped, kill=(1, 2, "SIGTERM")))
    assert [code for code, _ in results] == [143, 143], results
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    assert summary["steps"] == 3 and "3" in os.listdir(stopped / "checkpoints")

    # resumed, it loses process 1 (SIGKILL) after checkpoint 4: process 0 ends at once, with
    # one line, and records the run interrupted at that checkpoint
    children = launch(stopped, "--resume", kill=(1, 6, "SIGKILL"))
    assert children[1].wait(timeout=240) == -9
    lost = time.monotonic()
    ((code, err),) = finish(children[:1], timeout=60)
    assert time.monotonic() - lost < 30, "the survivor did not end promptly"
    assert code == EXIT_LOST and err.count("\n") == 1 and "Traceback" not in err, err
    assert ("process 0: this 2-process job lost a process at step 6" in err
            and "its last checkpoint is step 4): relaunch the whole job with --resume" in err)
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 4
    assert "lost a process at step 6" in summary["error"] and "signal" not in summary
    finish(children[1:])
    results = finish(launch(stopped, "--resume"))
    assert [code for code, _ in results] == [0, 0], results
    assert records(stopped) == records(reference)
    summary = json.loads((stopped / "summary.json").read_text())
    assert [a["status"] for a in summary["history"]] == ["interrupted", "interrupted"]

    # --overwrite: process 0 replaces the directory, the other waits for it
    results = finish(launch(stopped, "--overwrite"))
    assert [code for code, _ in results] == [0, 0], results
    assert records(stopped) == records(reference)


@pytest.mark.parametrize("env, message", [
    ({"JAX_NUM_PROCESSES": ""}, "JAX_NUM_PROCESSES: not set"),
    ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES: expected an integer >= 1, got 'two'"),
    ({"JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID: must be below JAX_NUM_PROCESSES=2, got 2"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost"}, "JAX_COORDINATOR_ADDRESS: expected host:port"),
])
def test_a_missing_or_bad_launch_variable_is_one_line(tmp_path, env, message, monkeypatch):
    launch = {"NORMEXP_DISTRIBUTED": "1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0",
              "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", **env}
    for name, value in launch.items():
        monkeypatch.setenv(name, value)

    def joined(*args, **kwargs):  # not in the test's process
        raise AssertionError("the launch variables passed")
    monkeypatch.setattr(jax.distributed, "initialize", joined)
    done = cli_in_process("train", *TINY, f"run.out_dir={tmp_path / 'run'}")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_lost_peer_is_told_from_other_runtime_errors(monkeypatch):
    from normexp.parallel import lost_peer
    gloo = ValueError("UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/"
                      "pair.cc:547] Connection closed by peer [127.0.0.1]:27013")
    reset = ValueError("UNKNOWN: Gloo AllGather failed: [...pair.cc:538] Read error "
                       "[127.0.0.1]:40363: Connection reset by peer")
    write = ValueError("INTERNAL: Error writing local file \"/runs/x/checkpoints/8/d/0\"")
    assert not lost_peer(gloo)  # one process: no peer to lose
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert lost_peer(gloo) and lost_peer(reset)
    assert not lost_peer(write) and not lost_peer(RuntimeError(str(gloo)))
