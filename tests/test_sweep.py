import csv
import json
import os
import sys

import numpy as np
import pytest

from normexp import config as config_lib
from normexp.fields import safe_name
from normexp import results as results_lib
from normexp import rundir
from normexp import sweep as sweep_lib
from normexp.errors import UsageError
from normexp.locks import RunLock
from normexp.rundir import read_metrics

from conftest import ROOT, cli_in_process, normexp, tiny_base, write_sweep


def overrides(sweep):
    return [dict(r.overrides) for r in sweep.runs]


# --- expansion and names -------------------------------------------------------------------

def test_grid_zip_and_seeds_expand_to_their_product_in_file_order(tmp_path):
    path = write_sweep(tmp_path, grid={"model.placement": ["pre", "post"],
                                       "model.norm.kind": ["layernorm", "rmsnorm"]},
                       zip={"optim.lr": [1e-3, 3e-3], "optim.warmup_steps": [0, 5]}, seeds=2)
    sweep = sweep_lib.load(path)
    assert len(sweep.runs) == 2 * 2 * 2 * 2
    assert sweep.axes == ("model.placement", "model.norm.kind", "optim.lr",
                          "optim.warmup_steps", "run.seed")
    assert overrides(sweep)[:3] == [
        {"model.placement": "pre", "model.norm.kind": "layernorm", "optim.lr": 1e-3,
         "optim.warmup_steps": 0, "run.seed": 0},
        {"model.placement": "pre", "model.norm.kind": "layernorm", "optim.lr": 1e-3,
         "optim.warmup_steps": 0, "run.seed": 1},
        {"model.placement": "pre", "model.norm.kind": "layernorm", "optim.lr": 3e-3,
         "optim.warmup_steps": 5, "run.seed": 0}]
    for run, over in zip(sweep.runs, overrides(sweep)):
        flat = config_lib.flatten(run.cfg)
        assert all(flat[k] == v for k, v in over.items())  # the overrides are what is run
        assert flat["data.seq_len"] == 16  # and the base is kept
        assert run.cfg.run.dir == os.path.join(str(tmp_path / "out"), run.name)
    assert sweep.runs[0].name == "placement=pre,kind=layernorm,lr=0.001,warmup_steps=0,seed=0"


def test_settings_replace_a_swept_list_the_seeds_or_a_base_key(tmp_path):
    path = write_sweep(tmp_path, grid={"optim.lr": [1e-3, 3e-3]},
                       zip={"model.placement": ["pre", "post"], "model.final_norm": [True, False]},
                       seeds=3)
    sweep = sweep_lib.load(path, settings=[("optim.lr", "[0.01]"), ("seeds", 1),
                                           ("model.placement", ["post"]),
                                           ("model.final_norm", [False]),
                                           ("train.steps", 7)])
    assert overrides(sweep) == [{"optim.lr": 0.01, "model.placement": "post",
                                 "model.final_norm": False, "run.seed": 0}]
    assert sweep.runs[0].cfg.train.steps == 7 and sweep.runs[0].cfg.data.seq_len == 16
    with pytest.raises(UsageError, match="--set optim.lr: expected a list of values"):
        sweep_lib.load(path, settings=[("optim.lr", 0.01)])
    with pytest.raises(UsageError, match="zip: lists must have one length"):
        sweep_lib.load(path, settings=[("model.placement", ["post"])])
    with pytest.raises(UsageError, match=r"--set: model.dmodel: unknown key"):
        sweep_lib.load(path, settings=[("model.dmodel", 64)])
    dry = normexp("sweep", path, "--dry-run", "--set", "optim.lr=[0.01]", "seeds=1",
                  "model.placement=[post]", "model.final_norm=[false]")
    assert dry.returncode == 0 and "1 runs" in dry.stdout, dry.stderr


def test_several_zips_multiply_and_seed_lists_are_kept(tmp_path):
    path = write_sweep(tmp_path, zip=[{"optim.lr": [1e-3, 2e-3]},
                                      {"model.n_layer": [1, 2, 3], "model.n_head": [1, 2, 1]}],
                       seeds=[7, 3])
    sweep = sweep_lib.load(path)
    assert len(sweep.runs) == 2 * 3 * 2
    assert [o["run.seed"] for o in overrides(sweep)[:2]] == [7, 3]


def test_a_sweep_without_axes_is_one_run_of_the_base(tmp_path):
    sweep = sweep_lib.load(write_sweep(tmp_path))
    assert [r.name for r in sweep.runs] == ["base"]


def test_names_are_stable_and_short_keys_stay_unique():
    short = sweep_lib.short_names(["model.norm.eps", "optim.eps", "optim.lr", "run.seed"])
    assert short == {"model.norm.eps": "norm.eps", "optim.eps": "optim.eps", "optim.lr": "lr",
                     "run.seed": "seed"}
    over = [("optim.lr", 0.003), ("model.norm.eps", 1e-6), ("run.seed", 2)]
    assert sweep_lib.run_name(over, short) == "lr=0.003,norm.eps=1e-06,seed=2"
    assert sweep_lib.run_name([("model.bias", False)], {"model.bias": "bias"}) == "bias=false"


HOSTILE = ["../escape", "/abs/path", "a/b", "a_b", "with space", "ünïcödé", "..", ".", "",
           "x" * 300, "-dash", "$(rm -rf ~)", "a\nb"]


def test_hostile_values_give_unique_safe_names_inside_the_sweep_dir(tmp_path):
    sweep = sweep_lib.load(write_sweep(tmp_path, grid={"data.path": HOSTILE}, seeds=2))
    names = [r.name for r in sweep.runs]
    assert len(set(names)) == len(names) == 2 * len(HOSTILE)
    out = os.path.realpath(tmp_path / "out")
    for r in sweep.runs:
        assert safe_name(r.name) is None, r.name
        assert len(r.name.encode()) < 200
        assert os.path.dirname(os.path.realpath(r.cfg.run.dir)) == out
    again = sweep_lib.load(write_sweep(tmp_path, grid={"data.path": HOSTILE}, seeds=2))
    assert [r.name for r in again.runs] == names  # deterministic


def test_shards_partition_the_runs_and_keep_vectorized_groups_whole(tmp_path):
    for vectorize in ("none", "seeds"):
        sweep = sweep_lib.load(write_sweep(
            tmp_path, grid={"model.placement": ["pre", "post", "peri"],
                            "optim.lr": [1e-3, 2e-3]}, seeds=3, vectorize=vectorize))
        units = sweep.units()
        if vectorize == "seeds":  # seeds and lr train together: one group per placement
            assert [len(u) for u in units] == [6, 6, 6]
        for n in (1, 2, 4, 7):
            shards = [[r.name for u in sweep_lib.shard_units(sweep, (i, n)) for r in u]
                      for i in range(1, n + 1)]
            flat = [name for shard in shards for name in shard]
            assert sorted(flat) == sorted(r.name for r in sweep.runs)
            assert len(flat) == len(set(flat))


def test_dry_run_lists_runs_and_count_and_writes_nothing(tmp_path):
    path = write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3]}, seeds=2)
    result = normexp("sweep", path, "--dry-run", "--shard", "2/2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == f"2 runs (shard 2/2 of 4) -> {tmp_path / 'out'}"
    assert lines[0] == "lr=0.001,seed=1: optim.lr=0.001 run.seed=1"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec, message", [
    ({"grdi": {"optim.lr": [1]}}, "grdi: unknown sweep key; did you mean 'grid'?"),
    ({"grid": {"optim.lr": []}}, "grid.optim.lr: empty list"),
    ({"grid": {"optim.lr": 0.1}}, "grid.optim.lr: expected a list of values, got 0.1"),
    ({"grid": [1, 2]}, "grid: expected a mapping"),
    ({"zip": {"optim.lr": [1, 2], "optim.eps": [1]}}, "lists must have one length"),
    ({"grid": {"optim.lr": [1e-3]}, "zip": {"optim.lr": [1e-3]}}, "optim.lr: swept twice"),
    ({"grid": {"run.seed": [1, 2]}}, "run.seed: set by the sweep itself"),
    ({"seeds": 0}, "seeds: a count must be >= 1"),
    ({"seeds": [1, 1]}, "repeats a seed"),
    ({"grid": {"optim.lr": [1e-3, -1]}}, "optim.lr: must be >= 0, got -1.0"),
    ({"grid": {"optim.lrr": [1]}}, "optim.lrr: unknown key; did you mean 'optim.lr'?"),
    ({"grid": {"optim.lr": [1e-3, 1e-3]}}, "an axis repeats a value"),
    ({"vectorize": "all"}, "vectorize: must be none or seeds"),
    ({"base": "missing.yaml"}, "missing.yaml: no such config file"),
    # once ignored without a word: the runs went to sweeps/<stem>/
    ({"base": {"run": {"out_dir": "elsewhere"}}, "grid": {"optim.lr": [1e-3]}},
     "base: run.out_dir: the sweep places each run under its own out_dir; set the sweep file's "
     "top-level out_dir:"),
])
def test_bad_sweep_files_name_the_problem(tmp_path, spec, message):
    with pytest.raises(UsageError, match=message.replace("?", r"\?").replace(".", r"\.")):
        sweep_lib.load(write_sweep(tmp_path, **spec))


def test_bad_sweep_file_exits_2_with_one_line_and_no_traceback(tmp_path):
    result = normexp("sweep", write_sweep(tmp_path, grid={"optim.lr": []}))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "grid.optim.lr: empty list" in result.stderr
    assert not (tmp_path / "out").exists()
    missing = cli_in_process("sweep", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "nope.yaml: no such config file" in missing.stderr
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    result = cli_in_process("sweep", str(empty))  # once trained a full default run
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "empty.yaml: is empty, expected a mapping of sweep keys" in result.stderr
    assert not os.path.exists(os.path.join(ROOT, "sweeps", "empty"))


# --- running ---------------------------------------------------------------------------------

def metrics_of(run_dir):
    return read_metrics(os.path.join(run_dir, "metrics.jsonl"))


def assert_same_metrics(a, b, rtol):
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        for key in ra:
            if ra[key] is None or rb[key] is None:
                assert ra[key] is rb[key] is None, key
            else:
                np.testing.assert_allclose(ra[key], rb[key], rtol=rtol, atol=1e-7, err_msg=key)


def test_dyt_alpha_inits_vectorize_and_equal_runs_trained_one_by_one(tmp_path):
    """DyT's alpha0 is a learned scalar's starting value: runs over it share one program."""
    spec = {"grid": {"model.norm.alpha_attn": [0.25, 2.0]}, "seeds": 1,
            "base": tiny_base("model.norm.kind=dyt", "train.steps=4", "log.activations=true")}
    vec = sweep_lib.load(write_sweep(tmp_path, "v", vectorize="seeds", **spec,
                                     out_dir=str(tmp_path / "v")))
    seq = sweep_lib.load(write_sweep(tmp_path, "q", **spec, out_dir=str(tmp_path / "q")))
    assert len(vec.units()) == 1 and len(seq.units()) == 2
    assert sweep_lib.run(vec, progress=False) == sweep_lib.run(seq, progress=False) == 0
    first = {}
    for r in vec.runs:
        v, q = metrics_of(r.cfg.run.dir), metrics_of(os.path.join(tmp_path / "q", r.name))
        for key in ("loss", "val_loss", "act/block_01/mlp_input_norm_alpha"):
            np.testing.assert_allclose([m.get(key, 0) for m in v], [m.get(key, 0) for m in q],
                                       rtol=1e-5, err_msg=key)
        first[r.name] = v[0]["act/block_00/attn_input_norm_alpha"]  # its alpha at step 0
    assert first == {"alpha_attn=0.25,seed=0": 0.25, "alpha_attn=2,seed=0": 2.0}


def test_vectorized_seeds_and_lrs_equal_runs_trained_one_by_one(tmp_path):
    # lr 1e30 diverges within a few steps: a diverged member must not disturb the others
    spec = {"grid": {"optim.lr": [3e-3, 1e30]}, "seeds": 2}
    vec = sweep_lib.load(write_sweep(tmp_path, "v", vectorize="seeds", **spec,
                                     out_dir=str(tmp_path / "v")))
    seq = sweep_lib.load(write_sweep(tmp_path, "q", **spec, out_dir=str(tmp_path / "q")))
    assert len(vec.units()) == 1 and len(seq.units()) == 4
    assert sweep_lib.run(vec, progress=False) == 0
    assert sweep_lib.run(seq, progress=False) == 0
    for r in vec.runs:
        v_dir, q_dir = r.cfg.run.dir, os.path.join(tmp_path / "q", r.name)
        v_sum = json.load(open(os.path.join(v_dir, "summary.json")))
        q_sum = json.load(open(os.path.join(q_dir, "summary.json")))
        assert v_sum["vectorized_runs"] == 4 and q_sum["vectorized_runs"] == 1
        assert (v_sum["status"], v_sum["diverged_step"]) == (q_sum["status"],
                                                             q_sum["diverged_step"])
        # float rounding differs between batched and plain matmuls; Adam's update/param ratios
        # amplify it the most
        assert_same_metrics(metrics_of(v_dir), metrics_of(q_dir), rtol=2e-3)
        losses = [[m.get(k) for m in metrics_of(d) for k in ("loss", "val_loss")]
                  for d in (v_dir, q_dir)]
        np.testing.assert_allclose(*[[x for x in ls if x is not None] for ls in losses],
                                   rtol=1e-5)
    statuses = {r.name: json.load(open(os.path.join(r.cfg.run.dir, "summary.json")))
                for r in vec.runs}
    assert {n: s["status"] for n, s in statuses.items()} == {
        "lr=0.003,seed=0": "completed", "lr=0.003,seed=1": "completed",
        "lr=1e+30,seed=0": "diverged", "lr=1e+30,seed=1": "diverged"}
    table = results_lib.table(str(tmp_path / "v")).set_index("run")
    diverged = table.loc["lr=1e+30,seed=0"]
    assert diverged["status"] == "diverged" and int(diverged["diverged_step"]) >= 0
    assert np.isnan(diverged["final_val_loss"])


def test_a_run_held_elsewhere_is_named_and_a_dead_holders_lock_is_taken_over(tmp_path,
                                                                              capsys):
    sweep = sweep_lib.load(write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3]},
                                       base=tiny_base("train.steps=4")))
    busy, stale = sweep.runs
    held = RunLock(sweep.out_dir, busy.name)
    assert held.acquire()  # another open file description: as good as another process
    with open(RunLock(sweep.out_dir, stale.name).path, "w") as f:
        json.dump({"host": "gone", "pid": 999999, "since": "yesterday"}, f)  # a killed holder
    try:
        assert sweep_lib.run(sweep, progress=False, wait=False) == 75
        err = capsys.readouterr().err
        assert f"{busy.name}: held by {held.holder()}; not waiting (--no-wait)" in err
        assert "taking over from gone pid 999999 since yesterday (not running)" in err
        assert err.strip().splitlines()[-1].startswith(
            f"sweep: 1 of 2 runs finished (1 completed); 1 not: {busy.name}; `normexp sweep")
        assert rundir.status(busy.cfg.run.dir) == "pending"
        assert rundir.status(stale.cfg.run.dir) == "completed"
        assert list(results_lib.table(sweep.out_dir)["status"]) == ["pending", "completed"]
    finally:
        held.release()
    assert sweep_lib.run(sweep, progress=False) == 0
    assert rundir.status(busy.cfg.run.dir) == "completed"


def test_a_crashed_run_is_recorded_as_failed_and_the_next_sweep_retries_it(tmp_path,
                                                                            monkeypatch):
    from normexp import train
    sweep = sweep_lib.load(write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3]},
                                       base=tiny_base("train.steps=2")))
    real = train._train

    def crash_on_the_first(members, *args, **kwargs):
        if members[0].cfg.optim.lr == 1e-3:
            raise RuntimeError("out of memory (simulated)")
        return real(members, *args, **kwargs)

    monkeypatch.setattr(train, "_train", crash_on_the_first)
    assert sweep_lib.run(sweep, progress=False) == 1
    failed = json.load(open(os.path.join(sweep.runs[0].cfg.run.dir, "summary.json")))
    assert failed["status"] == "failed"
    assert failed["error"] == "RuntimeError: out of memory (simulated)"
    assert list(results_lib.table(sweep.out_dir)["status"]) == ["failed", "completed"]
    monkeypatch.setattr(train, "_train", real)
    assert sweep_lib.run(sweep, progress=False) == 0
    assert list(results_lib.table(sweep.out_dir)["status"]) == ["completed"] * 2


def test_runs_use_the_sweeps_compile_cache(tmp_path):
    sweep = sweep_lib.load(write_sweep(tmp_path, seeds=2, base=tiny_base("train.steps=2")))
    cache = os.path.join(sweep.out_dir, ".compile_cache")
    assert all(r.cfg.train.compile_cache == cache for r in sweep.runs)
    assert sweep_lib.run(sweep, progress=False) == 0
    assert os.listdir(cache)
    own = sweep_lib.load(write_sweep(tmp_path, base=tiny_base("train.compile_cache=/elsewhere")))
    assert own.runs[0].cfg.train.compile_cache == "/elsewhere"


KILLER = '''
import os, signal, sys
from normexp import cli, tracking
victim, kill_at = sys.argv[1], int(sys.argv[2])
log = tracking.Tracker.log
def log_then_kill(self, step, metrics):
    log(self, step, metrics)
    if victim in self.path and step == kill_at and "loss" in metrics:
        os.kill(os.getpid(), signal.SIGKILL)
tracking.Tracker.log = log_then_kill
sys.exit(cli.main(sys.argv[3:]))
'''


def test_a_killed_sweep_reruns_to_the_table_of_an_uninterrupted_one(tmp_path):
    spec = {"grid": {"optim.lr": [1e-3, 2e-3, 3e-3]}}
    full = write_sweep(tmp_path, "full", **spec, out_dir=str(tmp_path / "full"))
    cut = write_sweep(tmp_path, "cut", **spec, out_dir=str(tmp_path / "cut"))
    assert normexp("sweep", full).returncode == 0
    killed = normexp_killing("lr=0.002", 6, "sweep", cut)
    assert killed.returncode == -9
    first = os.path.join(tmp_path / "cut", "lr=0.001")
    assert rundir.status(first) == "completed"
    assert rundir.status(os.path.join(tmp_path / "cut", "lr=0.003")) == "pending"
    assert results_lib.table(str(tmp_path / "cut"))["status"][1] == "stopped"
    finished = {f: os.stat(os.path.join(first, f)).st_mtime_ns
                for f in ("metrics.jsonl", "summary.json")}
    rerun = normexp("sweep", cut)
    assert rerun.returncode == 0, rerun.stderr
    assert "(not running)" in rerun.stderr  # the killed process's lock was taken over
    assert {f: os.stat(os.path.join(first, f)).st_mtime_ns for f in finished} == finished
    tables = [list(csv.DictReader(open(tmp_path / d / "results.csv"))) for d in ("full", "cut")]
    for row in tables[0] + tables[1]:
        row.pop("tokens_per_s")
    assert tables[0] == tables[1]
    assert_same_metrics(metrics_of(tmp_path / "full" / "lr=0.002"),
                        metrics_of(tmp_path / "cut" / "lr=0.002"), rtol=0)


def normexp_killing(victim, step, *args):
    import subprocess
    return subprocess.run([sys.executable, "-c", KILLER, victim, str(step), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_max_parallel_workers_train_each_run_once(tmp_path):
    path = write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3, 3e-3]},
                       base=tiny_base("train.steps=4"))
    result = normexp("sweep", path, "--max-parallel", "2")
    assert result.returncode == 0, result.stderr
    sweep = sweep_lib.load(path)
    for r in sweep.runs:
        assert rundir.status(r.cfg.run.dir) == "completed"
        steps = [m["step"] for m in metrics_of(r.cfg.run.dir)]
        assert steps == sorted(set(steps))  # one writer, one pass
    assert len(list(csv.DictReader(open(tmp_path / "out" / "results.csv")))) == 3


# --- results ---------------------------------------------------------------------------------


def test_the_slurm_launcher_runs_the_array_tasks_shard(tmp_path):
    import subprocess
    path = write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3, 3e-3]}, seeds=2)
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5",
           "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_SUBMIT_DIR": ROOT,
           "NORMEXP": os.path.join(os.path.dirname(sys.executable), "normexp")}
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "slurm_sweep.sh"), path,
                           "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = sweep_lib.describe(sweep_lib.load(path), (3, 4))
    assert done.stdout.strip() == expected and "(shard 3/4 of 6)" in expected
    bare = subprocess.run(["bash", os.path.join(ROOT, "scripts", "slurm_sweep.sh"), path],
                          env={"PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert bare.returncode != 0 and "submit with sbatch --array=1-N" in bare.stderr


def test_the_shipped_sweeps_expand_as_documented():
    warmup = sweep_lib.load(os.path.join(ROOT, "configs", "sweeps", "placement_warmup.yaml"))
    assert len(warmup.runs) == 2 * 2 * 3 * 2 * 3
    assert [len(u) for u in warmup.units()] == [9] * 8  # 3 lrs x 3 seeds per group
    assert warmup.out_dir == os.path.join("sweeps", "placement_warmup")
    assert {(r.cfg.model.placement, r.cfg.model.final_norm) for r in warmup.runs} == {
        ("pre", True), ("post", False)}
    lr = sweep_lib.load(os.path.join(ROOT, "configs", "sweeps", "lr_sensitivity.yaml"))
    assert len(lr.runs) == 3 * 2 * 7 * 4 * 3 and [len(u) for u in lr.units()] == [21] * 24
    assert {(r.cfg.model.placement, r.cfg.model.final_norm) for r in lr.runs} == {
        ("pre", True), ("post", False), ("peri", True), ("res_post", True)}
    c = lr.runs[0].cfg  # Wortsman et al.'s setup
    assert (c.optim.z_loss, c.optim.weight_decay, c.optim.beta2, c.optim.clip_norm,
            c.model.bias, c.data.corpus, c.log.attention) == (1e-4, 1e-4, 0.95, 1.0, False,
                                                              "stdlib", True)
    depth = sweep_lib.load(os.path.join(ROOT, "configs", "sweeps", "depth.yaml"))
    assert sorted((r.cfg.model.n_layer, r.cfg.model.placement) for r in depth.runs) == sorted(
        (n, p) for n in (2, 4, 8, 16) for p in ("pre", "post"))
    assert {r.cfg.model.d_model for r in depth.runs} == {64}
