import json
import os
import shutil

import numpy as np
import pytest

from normexp import analysis
from normexp.errors import UsageError
from normexp.rundir import read_metrics



def test_load_runs_gives_one_row_per_run_with_every_config_key(study):
    runs = analysis.load_runs(study.out_dir)
    assert list(runs["run"]) == [r.name for r in study.runs]
    assert {"model.placement", "optim.lr", "run.seed", "model.norm.kind", "final_val_loss",
            "max_grad_norm"} <= set(runs.columns)
    diverged = runs[runs["optim.lr"] == 1e30]
    assert set(diverged["status"]) == {"diverged"} and diverged["final_val_loss"].isna().all()
    done = runs[runs["optim.lr"] == 3e-3]
    assert set(done["status"]) == {"completed"} and (done["final_val_loss"] > 0).all()
    assert analysis.varying_keys(runs) == ["model.placement", "optim.lr", "run.seed"]
    one = analysis.load_runs(study.runs[0].cfg.run.dir)
    assert len(one) == 1 and one.iloc[0]["status"] == "completed"
    two = analysis.load_runs([study.runs[0].cfg.run.dir, study.runs[1].cfg.run.dir])
    assert list(two["run"]) == [study.runs[0].name, study.runs[1].name]


def test_load_metrics_is_long_and_keeps_every_per_layer_norm(study):
    metrics = analysis.load_metrics(study.out_dir)
    assert list(metrics.columns[:4]) == ["run", "step", "metric", "value"]
    name = study.runs[0].name
    records = read_metrics(os.path.join(study.runs[0].cfg.run.dir, "metrics.jsonl"))
    expected = [(r["step"], r["grad_norm/block_01/attn"]) for r in records
                if "grad_norm/block_01/attn" in r]
    rows = metrics[(metrics["run"] == name) & (metrics["metric"] == "grad_norm/block_01/attn")]
    assert list(zip(rows["step"], rows["value"])) == expected
    assert set(rows["layer"]) == {1} and set(rows["family"]) == {"grad_norm/block/attn"}
    assert set(metrics.loc[metrics["family"] == "grad_norm/block", "layer"]) == {0, 1}
    val = metrics[(metrics["run"] == name) & (metrics["metric"] == "val_loss")]
    assert list(val["step"]) == [r["step"] for r in records if "val_loss" in r]


def test_loaders_read_a_run_in_progress_and_skip_a_truncated_line(study, tmp_path):
    run_dir = tmp_path / "in_progress"
    shutil.copytree(study.runs[0].cfg.run.dir, run_dir)
    os.remove(run_dir / "summary.json")
    text = (run_dir / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text(text + text.splitlines()[1][:25])  # killed writer
    from normexp.locks import RunLock
    assert analysis.load_runs(str(run_dir)).iloc[0]["status"] == "stopped"  # nobody trains it
    lock = RunLock.of(str(run_dir))
    assert lock.acquire()  # as its process would
    try:
        runs = analysis.load_runs(str(run_dir))
    finally:
        lock.release()
    assert runs.iloc[0]["status"] == "started" and np.isnan(runs.iloc[0]["final_val_loss"])
    metrics = analysis.load_metrics(str(run_dir))
    assert metrics["step"].max() == json.loads(text.splitlines()[-1])["step"]


def test_loaders_reject_a_path_without_runs(tmp_path):
    with pytest.raises(Exception, match="no such run or sweep directory"):
        analysis.load_runs(tmp_path / "missing")
    with pytest.raises(Exception, match="holds no runs"):
        analysis.load_metrics(tmp_path)


def test_pending_lists_a_sweeps_runs_as_the_sweep_sees_them(study, tmp_path):
    sweep_dir = tmp_path / "sweep"
    done, dead = study.runs[0], study.runs[1]
    shutil.copytree(done.cfg.run.dir, sweep_dir / "done")
    shutil.copytree(dead.cfg.run.dir, sweep_dir / "dead")
    summary = json.loads((sweep_dir / "dead" / "summary.json").read_text())
    (sweep_dir / "dead" / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    runs = [{"name": n, "overrides": {"optim.lr": lr}}
            for n, lr in (("done", 3e-3), ("dead", 3e-3), ("later", 1e-2))]
    (sweep_dir / "sweep.json").write_text(json.dumps({"axes": ["optim.lr"], "runs": runs}))
    plain = analysis.load_runs(str(sweep_dir))
    # its process is gone (no live lock holder), and a probe never takes the lock
    assert list(plain["status"]) == ["completed", "stopped"]
    seen = analysis.load_runs(str(sweep_dir), pending=True)
    assert list(seen["run"]) == ["done", "dead", "later"]
    assert list(seen["status"]) == ["completed", "stopped", "pending"]
    later = seen.loc["later"]
    assert later["optim.lr"] == 1e-2 and np.isnan(later["steps"])
    assert seen["model.placement"].isna().tolist() == [False, False, True]  # not written yet


def test_lr_sensitivity_by_hand_with_diverged_runs():
    """Two setups x three learning rates x two seeds, l_0 = 5.5. qk off: means 2.1, 1.7 and, at
    0.1, one diverged run and one worse than init (both count as 5.5): l* = 1.7, sensitivity
    (0.4 + 0 + 3.8) / 3 = 1.4. qk on: 2.1, 1.8, 2.5: (0.3 + 0 + 0.7) / 3."""
    import pandas as pd
    losses = {("off", 1e-3): [2.0, 2.2], ("off", 1e-2): [1.8, 1.6], ("off", 1e-1): [None, 6.0],
              ("on", 1e-3): [2.1, 2.1], ("on", 1e-2): [1.9, 1.7], ("on", 1e-1): [2.4, 2.6]}
    rows = [{"model.qk_norm": qk, "optim.lr": lr, "run.seed": seed, "initial_loss": 5.5,
             "final_val_loss": loss, "status": "diverged" if loss is None else "completed"}
            for (qk, lr), pair in losses.items() for seed, loss in enumerate(pair)]
    out = analysis.lr_sensitivity(pd.DataFrame(rows)).set_index("model.qk_norm")
    assert out.loc["off", "lr_sensitivity"] == pytest.approx(1.4)
    assert out.loc["on", "lr_sensitivity"] == pytest.approx(1.0 / 3)
    assert out.loc["off", "best_loss"] == pytest.approx(1.7) and out.loc["off", "best_lr"] == 1e-2
    assert out.loc["off", "diverged"] == 1 and out.loc["on", "diverged"] == 0
    assert (out["lrs"] == 3).all() and (out["runs"] == 6).all()
    unfinished = pd.DataFrame(rows).assign(status=["interrupted"] + ["completed"] * 11)
    with pytest.raises(UsageError, match="1 run\\(s\\) did not finish"):
        analysis.lr_sensitivity(unfinished)
    no_l0 = pd.DataFrame(rows).assign(initial_loss=[5.5] * 11 + [None])
    with pytest.raises(UsageError, match="1 run\\(s\\) have no initial_loss"):
        analysis.lr_sensitivity(no_l0)


def test_lr_sensitivity_of_a_real_sweep_counts_its_diverged_runs_at_the_initial_loss(study):
    runs = analysis.load_runs(study.out_dir)
    assert list(runs["initial_loss"]) == [read_metrics(d)[0]["val_loss"]
                                          for d in runs["run_dir"]]
    out = analysis.lr_sensitivity(runs).set_index("model.placement")
    assert set(out.index) == {"pre", "post"} and (out["diverged"] == 2).all()
    for placement, row in out.iterrows():
        mine = runs[runs["model.placement"] == placement]
        trained = mine[mine["optim.lr"] == 3e-3]["final_val_loss"].mean()
        l0 = mine[mine["optim.lr"] == 1e30]["initial_loss"].mean()
        assert row["best_loss"] == pytest.approx(trained) and row["best_lr"] == 3e-3
        assert row["lr_sensitivity"] == pytest.approx((l0 - trained) / 2)
