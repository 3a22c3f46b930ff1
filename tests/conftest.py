import os
import struct
import shutil
import subprocess
import sys
import tempfile
import warnings

import pytest
import yaml

# Tests compile a few hundred tiny programs, and compiling is most of the suite's time. Three
# XLA:CPU flags make it cheaper and change no semantics (no fast-math): LLVM's optimisation
# level 0 (~40% faster); XLA's own loop emitters for fusions instead of the MLIR fusion
# emitters, and one codegen thread (test_placement, test_norms and test_step on 2 workers:
# 236 -> 97 s). Users' runs, `make demo` and `normexp bench` run XLA's defaults. Set before
# any backend starts; subprocesses inherit them.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
                  "--xla_cpu_parallel_codegen_split_count=1")
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), *(
    flag for flag in TEST_XLA_FLAGS if flag not in os.environ.get("XLA_FLAGS", ""))]))
# The suite compiles the same tiny programs many times over: in-process, in the command-line
# subprocesses, on every xdist worker. XLA's persistent cache compiles each once (test_train.py
# and test_checkpoint.py on 2 workers: 212 -> 139 s); a cached executable is the one XLA would
# compile, its key holding the program, the flags and the versions. One folder per session,
# made by the controller before its workers start (they and every subprocess inherit it) and
# removed at the end. Tests kill processes mid-write, and jax writes an entry in place: an
# entry cut short fails to load, and jax then warns and compiles, so those two warnings are
# silenced here and in every subprocess.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="normexp-tests-xla-")
    os.environ["NORMEXP_TESTS_OWN_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
CACHE_WARNINGS = ("Error reading persistent compilation cache entry",
                  "Error writing persistent compilation cache entry")
for warning in CACHE_WARNINGS:
    warnings.filterwarnings("ignore", warning, UserWarning)
    if warning not in os.environ.get("PYTHONWARNINGS", ""):  # a worker inherits them
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [
            os.environ.get("PYTHONWARNINGS"), f"ignore:{warning}:UserWarning"]))

from normexp.config import load  # noqa: E402

# The tests that take longest (seconds on one xdist worker, a run's --durations: 2026-12-06,
# or 2026-12-07 for the entries changed since) run first: pytest-xdist hands tests out in
# order, so these overlap the rest instead of ending the suite alone. README's Tests section
# lists them with their cost.
SLOW_FIRST = (
    "test_parallel.py::test_two_processes_train_as_one_job_stop_together_and_resume",  # 78
    "test_claims.py::test_claims_1_to_8_run_on_a_tiny_setup_and_write_their_table",  # 69
    "test_bench.py::test_quick_bench_produces_every_figure",  # 26
    "test_sweep.py::test_a_killed_sweep_reruns_to_the_table_of_an_uninterrupted_one",  # 20
    "test_claims.py::test_the_qkv_claim_finds_each_setups_largest_stable_lr_in_its_sweep",  # 22
    "test_scheduler.py::test_a_killed_worker_is_named_and_its_run_taken_over",  # 18
    "test_accelerator.py::test_quick_check_produces_every_field_on_two_host_devices",  # 16
    "test_parallel.py::test_data_parallel_over_four_devices_equals_one_device",  # 15
    "test_claims.py::test_the_depth_claims_train_four_placements_and_prune_every_seed",  # 14
    "test_rundir.py::test_existing_run_dir_is_never_replaced_silently",  # 14
    "test_step.py::test_every_way_of_applying_the_blocks_gives_the_same_gradients",  # 13 + 9
    "test_claims.py::test_claims_command_runs_one_claim_at_a_changed_size",  # 12
    "test_scheduler.py::test_sigterm_to_the_parent_stops_every_worker",  # 11
    "test_sweep.py::test_max_parallel_workers_train_each_run_once",  # 11
    "test_scheduler.py::test_workers_die_with_their_parent",  # 9
    "test_train.py::test_killed_and_resumed_run_equals_the_uninterrupted_one",  # 4 x 10
    "test_claims.py::test_the_dyt_claim_trains_each_alpha0_grid_cell_as_one_group",  # 9
    "test_notebook.py::test_the_analysis_notebook_executes_on_a_tiny_sweep",  # 10 with setup
)


def pytest_sessionfinish(session):
    """The controller (or a run without xdist) removes the cache folder it made."""
    own = os.environ.get("NORMEXP_TESTS_OWN_CACHE")
    if own and not hasattr(session.config, "workerinput"):
        shutil.rmtree(own, ignore_errors=True)


def pytest_collection_modifyitems(items):
    """The SLOW_FIRST tests first, in that order; the rest as collected."""
    def rank(item):
        name = item.nodeid.split("/")[-1]
        return next((i for i, slow in enumerate(SLOW_FIRST) if name.startswith(slow)),
                    len(SLOW_FIRST))
    items.sort(key=rank)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model small enough that a run compiles and trains in seconds on 2 cores.
TINY = ["model.n_layer=2", "model.n_head=2", "model.d_model=32", "data.seq_len=16",
        "data.eval_batches=2", "train.batch_size=4", "train.steps=12", "train.eval_every=4",
        "train.checkpoint_every=4", "log.every=2", "log.progress=false",
        "log.tensorboard=false", "optim.warmup_steps=2", "optim.lr=3e-3"]


@pytest.fixture
def tiny(tmp_path):
    """tiny(*overrides) -> a Config of the tiny model writing under tmp_path."""
    def make(*overrides):
        return load(None, TINY + [f"run.out_dir={tmp_path / 'run'}", *overrides])
    return make


def normexp(*args, cwd=None, env=None):
    """Run the `normexp` command line in a fresh interpreter; returns CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "normexp.cli", *args], cwd=cwd or ROOT,
                          capture_output=True, text=True, env=env, timeout=300)


def cli_in_process(*args, cwd=None):
    """`normexp ARGS` in this interpreter (`cli.main`): saves the ~2 s a fresh interpreter with
    jax costs. For refusals (usage, config and data errors) and for runs that need no process
    of their own (no signal, no fd-level output, no failing background save, whose handling
    points fd 2 elsewhere for the rest of the process). Returns a CompletedProcess
    (returncode, stdout, stderr); an exception escapes, where a traceback would have been
    printed. The subprocess tests keep a real process's exit code and stderr in view."""
    import contextlib
    import io
    from normexp import cli
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd or ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main([str(a) for a in args])
            except SystemExit as e:  # argparse's errors, --help
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def tiny_base(*extra):
    """The tiny model's overrides as the nested mapping of a sweep's inline base."""
    base = {}
    for item in [*TINY, *extra]:
        key, value = item.split("=", 1)
        *sections, leaf = key.split(".")
        node = base
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return base


def write_sweep(tmp_path, name="s", **spec):
    spec.setdefault("base", tiny_base())
    spec.setdefault("out_dir", str(tmp_path / "out"))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def tensorboard_values(run_dir):
    """{tag: [summary values]} of the run's event file, read as TFRecords of Event protos."""
    from tensorboardX.proto import event_pb2
    (name,) = [f for f in os.listdir(run_dir) if f.startswith("events.out.tfevents")]
    values, blob = {}, open(os.path.join(run_dir, name), "rb").read()
    offset = 0
    while offset < len(blob):
        (length,) = struct.unpack("<Q", blob[offset:offset + 8])
        event = event_pb2.Event.FromString(blob[offset + 12:offset + 12 + length])
        for v in event.summary.value:
            values.setdefault(v.tag, []).append(v)
        offset += 12 + length + 4
    return values


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """The records of the uninterrupted tiny run, logged every step: what every killed,
    damaged or failed and then resumed run must reproduce bit for bit."""
    from normexp.rundir import read_metrics
    out = tmp_path_factory.mktemp("reference") / "run"
    done = normexp("train", *TINY, "log.every=1", f"run.out_dir={out}")
    assert done.returncode == 0, done.stderr
    return read_metrics(os.path.join(out, "metrics.jsonl"))


T = 16  # the sequence length of the models tests build directly


def model_of(tiny, *overrides, seed=0):
    """A tiny model (vocabulary 64, sequences of T) built from the tiny config."""
    from normexp.model import make_model
    cfg = tiny(*overrides)
    return make_model(cfg.model, vocab_size=64, max_len=T, seed=seed)


def tokens(seed=0, batch=3):
    """A batch of random token ids for `model_of`'s models."""
    import jax
    return jax.random.randint(jax.random.key(seed), (batch, T), 0, 64)


def tiny_args(out):
    """The tiny model's command-line overrides, writing to `out`."""
    return [*TINY, f"run.out_dir={out}"]


@pytest.fixture(scope="session")
def study(tmp_path_factory):
    """A tiny finished sweep: placement x lr (1e30 diverges) x 2 seeds, 8 runs, with spike
    scores over 4 steps."""
    from normexp import sweep as sweep_lib
    tmp = tmp_path_factory.mktemp("study")
    sweep = sweep_lib.load(write_sweep(tmp, grid={"model.placement": ["pre", "post"],
                                                  "optim.lr": [3e-3, 1e30]},
                                       seeds=2, vectorize="seeds",
                                       base=tiny_base("log.spike_window=4")))
    assert sweep_lib.run(sweep, progress=False) == 0
    return sweep
