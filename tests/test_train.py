import contextlib
import json
import os
import signal
import sys

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from normexp import data as data_lib
from normexp import train as train_lib
from normexp.checkpoint import Checkpoints
from normexp.rundir import read_metrics
from normexp.spikes import spike_scores
from normexp.step import init_state, make_train_step
from normexp.train import run

from conftest import cli_in_process, normexp, tensorboard_values, tiny_args

KILLER = '''
import os, signal, sys
from normexp import cli, tracking
kill_at, sig = int(sys.argv[1]), getattr(signal, sys.argv[2])
log = tracking.Tracker.log
def log_then_kill(self, step, metrics):
    log(self, step, metrics)
    if step == kill_at and "loss" in metrics:
        os.kill(os.getpid(), sig)
tracking.Tracker.log = log_then_kill
sys.exit(cli.main(sys.argv[3:]))
'''


def test_bfloat16_trains_with_finite_loss(tiny, tmp_path):
    summary = run(tiny("model.dtype=bfloat16", "train.steps=20"))
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert summary.status == "completed" and all(np.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]


def test_tiny_run_end_to_end(tiny, tmp_path):
    cfg = tiny("train.steps=40", "log.every=5", "train.eval_every=20", "log.tensorboard=true",
               "log.spike_window=10", "log.spike_sigma=0.5")
    summary = run(cfg)
    run_dir = tmp_path / "run"
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["36", "40"]  # every 4, the last 2 kept
    assert summary.status == "completed" and summary.steps == 40
    on_disk = json.loads((run_dir / "summary.json").read_text())
    for key in ("status", "steps", "diverged_step", "final_val_loss", "best_val_loss",
                "tokens_per_s", "compile_seconds", "data_fingerprint", "versions"):
        assert key in on_disk
    assert on_disk["tokens_per_s"] > 0 and on_disk["compile_seconds"] > 0
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [0, 5, 10, 15, 20, 25, 30, 35, 39]
    assert train[0]["lr"] == 0.0 and train[0]["grad_norm/block_01/attn"] > 0  # init logged
    vals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert [s for s, _ in vals] == [0, 20, 40]
    assert vals[-1][1] < vals[0][1] - 0.5  # it learns
    assert on_disk["final_val_loss"] == pytest.approx(vals[-1][1])
    assert on_disk["best_val_loss"] == pytest.approx(min(v for _, v in vals))
    # the spike scores of what it logged (steps 10 to 39 each have a window of two values)
    scores = spike_scores(train, sigma=0.5, window=10)
    assert {k: on_disk[k] for k in scores} == scores
    assert all(score is not None for score in scores.values())
    values = tensorboard_values(run_dir)
    assert {"loss", "grad_norm/block_00/mlp", "update_ratio/block_01", "val_loss"} <= set(values)
    # the HParams dashboard: the run's config as its hyperparameters, in its own event file
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
    (start,) = values["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(start.metadata.plugin_data.content)
    hparams = hparams.session_start_info.hparams
    assert hparams["optim.lr"].number_value == pytest.approx(3e-3)
    assert hparams["model.placement"].string_value == "pre"
    assert hparams["log.grad_norms"].bool_value is True
    (end,) = values["_hparams_/session_end_info"]  # written when the run ended, with its status
    ended = HParamsPluginData.FromString(end.metadata.plugin_data.content).session_end_info
    from tensorboardX.proto.api_pb2 import Status
    assert ended.status == Status.Value("STATUS_SUCCESS")


def test_activation_statistics_are_computed_at_log_steps_only(tiny, tmp_path):
    cfg = tiny("log.activations=true", "log.every=3", "train.steps=7")
    corpus = data_lib.load_corpus("", 0, cfg.data.seq_len)
    graphdef, tx, state = init_state(cfg, corpus.vocab_size)
    step = make_train_step(graphdef, tx, grad_norms=True, activations=True, log=(3, 7))
    plain = make_train_step(graphdef, tx, grad_norms=True, log=(3, 7))
    for s in range(7):
        x, y = data_lib.batch(corpus.train, seed=0, step=s, batch_size=4, seq_len=16)
        reference, metrics = plain(jax.tree.map(np.copy, state), x, y)
        state, metrics_with = step(state, x, y)
        acts = {k: np.asarray(v) for k, v in metrics_with.items() if k.startswith("act/")}
        assert sorted(acts) == [f"act/block/{name}" for name in sorted([
            "attn_input_norm_rms", "mlp_input_norm_rms", "mean", "var", "rms", "kurtosis",
            "attn_update_ratio", "mlp_update_ratio", "q_rms", "k_rms", "v_rms", "proj_rms",
            "up_rms", "down_rms"])]
        logged = s % 3 == 0 or s == 6
        assert all((np.abs(v) > 0).all() == logged for v in acts.values()), (s, acts)
        # recording is a side branch: the update is the one without it
        for a, b in zip(jax.tree.leaves(reference["params"]), jax.tree.leaves(state["params"])):
            np.testing.assert_array_equal(a, b)
    run(cfg)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [0, 3, 6]
    assert all(r["act/block_01/rms"] > 0 and "act/block_00/kurtosis" in r for r in records)


def test_no_grad_norms_logs_only_the_global_norm(tiny, tmp_path):
    run(tiny("log.grad_norms=false", "train.steps=2"))
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert "grad_norm" in first and not any(k.startswith("grad_norm/") for k in first)


def test_divergence_is_a_result(tiny, tmp_path):
    out = tmp_path / "run"
    result = normexp("train", *tiny_args(out), "optim.lr=1e4", "optim.clip_norm=0",
                     "optim.warmup_steps=0", "model.placement=post", "model.final_norm=false",
                     "optim.weight_decay=0", "train.steps=200", "log.every=10")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged", summary
    step = summary["diverged_step"]
    assert isinstance(step, int) and 0 < step < 200 and summary["final_val_loss"] is None
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert records[-1]["step"] >= step and summary["steps"] == records[-1]["step"] + 1
    assert all(r["loss"] is not None for r in records if r["step"] < step)
    assert records[-1]["loss"] is None or records[-1]["grad_norm"] is None


def train_records(path):
    return read_metrics(os.path.join(path, "metrics.jsonl"))


@pytest.mark.parametrize("signal_name, kill_at, exit_code, background", [
    ("SIGKILL", 7, -9, "off"),   # between checkpoints: steps 4..7 are logged again on resuming
    ("SIGINT", 11, 130, "off"),  # Ctrl-C at the last step: the resumed run still ends with eval
    ("SIGKILL", 9, -9, "on"),  # background saves: the one of step 8 may still be writing
    ("SIGTERM", 6, 143, "on"),  # a clean stop: its checkpoint (step 7) is written before exit
])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path, reference_run,
                                                              signal_name, kill_at, exit_code,
                                                              background):
    broken = tmp_path / "broken"
    args = ["log.every=1", f"train.async_checkpoints={background}"]
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    import subprocess
    killed = subprocess.run([sys.executable, str(killer), str(kill_at), signal_name, "train",
                             *tiny_args(broken), *args], capture_output=True, text=True)
    assert killed.returncode == exit_code, killed.stderr
    assert train_records(broken)[-1]["step"] == kill_at  # it got that far
    if signal_name != "SIGKILL":
        summary = json.loads((broken / "summary.json").read_text())
        assert summary["status"] == "interrupted" and summary["steps"] == kill_at + 1
        assert str(kill_at + 1) in os.listdir(broken / "checkpoints")
    resumed = cli_in_process("train", str(broken / "config.yaml"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert train_records(broken) == reference_run  # bit for bit, every step
    summary = json.loads((broken / "summary.json").read_text())
    assert summary["status"] == "completed"
    # from the last whole checkpoint: with background saves, step 8's may not have been
    assert summary["resumed_at"] in ({kill_at + 1} if signal_name != "SIGKILL" else
                                     {4} if background == "off" else {4, 8})


def test_compile_cache_is_written_and_reused(tiny, tmp_path):
    cache = tmp_path / "cache"
    suite_cache = jax.config.jax_compilation_cache_dir  # conftest's, or None
    try:
        run(tiny("train.steps=2", f"train.compile_cache={cache}"))
    finally:  # leave later tests in this process with the cache they had
        jax.config.update("jax_compilation_cache_dir", suite_cache)
        compilation_cache.reset_cache()

    def entries():  # the executables (jax also keeps access times when its cache is bounded)
        return {f: os.stat(cache / f).st_mtime_ns for f in os.listdir(cache)
                if f.startswith(("jit_train_step", "jit_eval")) and f.endswith("-cache")}

    first = entries()
    assert len(first) == 2  # the train step and the eval step were persisted
    second = normexp("train", *tiny_args(tmp_path / "again"), "train.steps=2",
                     f"train.compile_cache={cache}")
    assert second.returncode == 0, second.stderr
    assert entries() == first  # read, not rewritten: a fresh process skipped both compiles


def test_batchnorm_running_statistics_are_checkpointed_and_its_leak_reported(tiny, tmp_path,
                                                                              capsys):
    cfg = tiny("model.norm.kind=batchnorm", "train.steps=4")
    graphdef, tx, state = init_state(cfg, 256)
    fresh = jax.tree.map(np.asarray, state["rest"])
    step = make_train_step(graphdef, tx, grad_norms=False)
    corpus = data_lib.load_corpus("", 0, 16)
    for i in range(3):
        state, _ = step(state, *data_lib.batch(corpus.train, seed=0, step=i, batch_size=4,
                                                seq_len=16))
    trained = jax.tree.map(np.asarray, state["rest"])
    leaves = lambda tree: jax.tree.leaves(tree)
    assert any(not np.allclose(a, b) for a, b in zip(leaves(fresh), leaves(trained)))
    checkpoints = Checkpoints(str(tmp_path / "ckpt"), keep=1)
    checkpoints.save(3, state)
    restored = checkpoints.restore(3, init_state(cfg, 256)[2])
    checkpoints.close()
    for a, b in zip(leaves(trained), leaves(restored["rest"])):
        np.testing.assert_array_equal(a, b)

    summary = run(cfg)  # evaluates with the running statistics, and says that it leaks
    assert summary.status == "completed" and np.isfinite(summary.final_val_loss)
    assert summary.norms == {"kind": "batchnorm", "placement": "pre",
                                "leaks_across_positions": True, "batch_statistics": True}
    assert "model.norm.kind=batchnorm pools statistics over positions" in capsys.readouterr().err


def signal_after(count, sig=signal.SIGTERM):
    """A wrapper of f that sends this process `sig` right after f's count-th call returns."""
    calls = []

    def wrap(f):
        def wrapped(*args, **kwargs):
            out = f(*args, **kwargs)
            calls.append(1)
            if len(calls) == count:
                os.kill(os.getpid(), sig)
            return out
        return wrapped
    return wrap


def signalling_eval(count):
    """make_eval_step whose compiled evaluation sends SIGTERM after its count-th batch."""
    real, wrap = train_lib.make_eval_step, signal_after(count)

    class Lowered:
        def __init__(self, lowered):
            self.lowered = lowered

        def compile(self):
            return wrap(self.lowered.compile())

    class Jitted:
        def __init__(self, jitted):
            self.jitted = jitted

        def lower(self, *args):
            return Lowered(self.jitted.lower(*args))

    return lambda graphdef, vectorized=False: Jitted(real(graphdef, vectorized))


SIGNALLED = ["train.steps=60", "train.checkpoint_every=20", "train.eval_every=20", "log.every=5",
             "train.keep_checkpoints=5"]


@pytest.fixture(scope="module")
def signalled_reference(tmp_path_factory):
    from conftest import TINY
    from normexp.config import load
    out = tmp_path_factory.mktemp("signalled") / "reference"
    summary = run(load(None, [*TINY, *SIGNALLED, f"run.out_dir={out}"]))
    return summary, train_records(out)


@pytest.mark.parametrize("where, count, stopped_after", [
    ("checkpoint", 1, 21),   # while checkpoint 20 of 60 is written: the next step stops
    ("checkpoint", 3, 60),   # while the last checkpoint is written: the run did finish
    ("evaluation", 5, 41),   # inside the evaluation at step 40 (2 batches an evaluation)
    ("evaluation", 7, 60),   # inside the final evaluation, after the last step
])
def test_a_signal_at_any_moment_never_marks_an_unfinished_run_completed(
        tiny, tmp_path, monkeypatch, signalled_reference, where, count, stopped_after):
    reference, reference_records = signalled_reference
    cfg = tiny(*SIGNALLED)
    with monkeypatch.context() as patch:
        if where == "checkpoint":
            patch.setattr(Checkpoints, "save", signal_after(count)(Checkpoints.save))
        else:
            patch.setattr(train_lib, "make_eval_step", signalling_eval(count))
        summary = run(cfg)
    if stopped_after == 60:
        assert summary.status == "completed" and summary.steps == 60
    else:
        assert summary.status == "interrupted" and summary.steps == stopped_after
        assert summary.signal == "SIGTERM"
        assert str(stopped_after) in os.listdir(tmp_path / "run" / "checkpoints")
        summary = run(cfg, resume=True)
    assert summary.status == "completed" and summary.steps == 60
    assert summary.final_val_loss == reference.final_val_loss
    assert train_records(tmp_path / "run") == reference_records


# --- a failing disk: full, refusing a file's size, read-only ---------------------------------

FULL_DISK = '''
import resource, signal, sys
from normexp import cli
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(cli.main(sys.argv[2:]))
'''


def assert_storage_error(result, fragment):
    assert result.returncode == 74, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("normexp: error: ") and fragment in result.stderr


@pytest.mark.parametrize("background", ["off", "on"])
def test_a_write_the_disk_refuses_fails_the_run_in_one_line_and_it_resumes(tmp_path,
                                                                           reference_run,
                                                                           background):
    """Every file over 100 kB is refused (RLIMIT_FSIZE): the first checkpoint's data file."""
    broken = tmp_path / "broken"
    import subprocess
    failed = subprocess.run([sys.executable, "-c", FULL_DISK, str(100_000), "train",
                             *tiny_args(broken), "log.every=1",
                             f"train.async_checkpoints={background}"],
                            capture_output=True, text=True)
    assert_storage_error(failed, "File too large (errno 27)")
    summary = json.loads((broken / "summary.json").read_text())
    assert summary["status"] == "failed" and "File too large" in summary["error"]
    assert summary["steps"] == 0  # no checkpoint holds a step: the resume starts over
    # a background save's failure is found at the next save
    assert train_records(broken)[-1]["step"] == (3 if background == "off" else 7)
    resumed = normexp("train", str(broken / "config.yaml"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert train_records(broken) == reference_run


@contextlib.contextmanager
def mounted(target, *options):
    """`mount *options target` for the test's duration (skipped where mounting is not allowed)."""
    os.makedirs(target, exist_ok=True)
    import subprocess
    done = subprocess.run(["mount", *options, str(target)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


FILLER = '''
import errno, os, sys
from normexp import checkpoint, cli
fill_after, filler, headroom = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
record = checkpoint.Checkpoints._record
def record_then_fill(self, step):
    record(self, step)
    if step == fill_after:  # the disk is full from here on, whatever the checkpoints weigh
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(bytes(1 << 16))
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
            f.truncate(f.seek(0, os.SEEK_END) - headroom)  # room left for the failure record
checkpoint.Checkpoints._record = record_then_fill
sys.exit(cli.main(sys.argv[4:]))
'''


def test_a_full_disk_fails_the_run_and_it_resumes_once_there_is_room(tmp_path, reference_run):
    """The disk fills up once checkpoint 8 is recorded, leaving 64 kB (room for the rest of
    the metrics and the summary, not for a checkpoint of ~480 kB): the save of step 12 fails."""
    filler_script = tmp_path / "filler.py"
    filler_script.write_text(FILLER)
    with mounted(tmp_path / "disk", "-t", "tmpfs", "-o", "size=4m", "tmpfs") as disk:
        run_dir, filler = disk / "run", disk / "filler"
        import subprocess
        failed = subprocess.run([sys.executable, str(filler_script), "8", str(filler),
                                 str(64 << 10), "train", *tiny_args(run_dir), "log.every=1",
                                 "train.async_checkpoints=off"],  # the fill in this thread
                                capture_output=True, text=True, timeout=300)
        assert_storage_error(failed, "No space left on device (errno 28)")
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "failed" and "No space left" in summary["error"]
        assert sorted(os.listdir(run_dir / "checkpoints")) == ["4", "8"]  # 12's partial removed
        assert train_records(run_dir)[-1]["step"] == 11  # it failed at the save after step 11
        os.remove(filler)
        resumed = normexp("train", str(run_dir / "config.yaml"), "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert train_records(run_dir) == reference_run
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_a_read_only_directory_is_one_line_and_nothing_is_lost(tmp_path):
    writable = tmp_path / "writable"
    run(load_tiny(writable, "train.steps=8"))
    before = {f: (writable / f).read_bytes() for f in ("metrics.jsonl", "summary.json")}
    with mounted(tmp_path / "ro", "--bind", "-o", "ro", str(tmp_path)) as ro:
        result = normexp("train", *tiny_args(ro / "new"))
        assert_storage_error(result, "Read-only file system (errno 30)")
        assert str(ro / "new") in result.stderr
        result = normexp("train", *tiny_args(ro / "writable"), "train.steps=8", "--overwrite")
        assert_storage_error(result, "Read-only file system (errno 30)")
    assert {f: (writable / f).read_bytes() for f in before} == before


def load_tiny(out, *overrides):
    from normexp.config import load
    from conftest import TINY
    return load(None, [*TINY, f"run.out_dir={out}", *overrides])
