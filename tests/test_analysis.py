import json
import os
import shutil

import numpy as np
import pytest

from normexp import analysis, plots, sweep as sweep_lib
from normexp.report import write_report
from normexp.rundir import read_metrics

from conftest import normexp, write_sweep


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny finished sweep: placement x lr (1e30 diverges) x 2 seeds, 8 runs."""
    tmp = tmp_path_factory.mktemp("study")
    sweep = sweep_lib.load(write_sweep(tmp, grid={"model.placement": ["pre", "post"],
                                                  "optim.lr": [3e-3, 1e30]},
                                       seeds=2, vectorize="seeds"))
    assert sweep_lib.run(sweep, progress=False) == 0
    return sweep


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
    runs = analysis.load_runs(str(run_dir))
    assert runs.iloc[0]["status"] == "started" and np.isnan(runs.iloc[0]["final_val_loss"])
    metrics = analysis.load_metrics(str(run_dir))
    assert metrics["step"].max() == json.loads(text.splitlines()[-1])["step"]


def test_loaders_reject_a_path_without_runs(tmp_path):
    with pytest.raises(Exception, match="no such run or sweep directory"):
        analysis.load_runs(tmp_path / "missing")
    with pytest.raises(Exception, match="holds no runs"):
        analysis.load_metrics(tmp_path)


def test_plot_helpers_draw_one_line_or_cell_per_setup(study):
    runs, metrics = analysis.load_runs(study.out_dir), analysis.load_metrics(study.out_dir)
    assert len(plots.setups(runs)) == 4  # placement x lr; seeds are averaged
    fig = plots.loss_curves(metrics, runs)
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 4 and ax.get_xlabel() == "step"
    assert any("2 of 2 diverged" in t.get_text() for t in ax.get_legend().get_texts())
    fig = plots.loss_curves(metrics, runs, by="model.placement", metric="val_loss")
    assert len(fig.axes[0].get_lines()) == 2
    fig = plots.grad_norm_by_layer(metrics, runs, step=0)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 4 and all(len(line.get_xdata()) == 2 for line in lines)
    assert "initialisation" in fig.axes[0].get_title()
    fig = plots.grad_norm_heatmap(metrics, study.runs[0].name)
    logged = metrics[(metrics["run"] == study.runs[0].name)
                     & (metrics["family"] == "grad_norm/block")]["step"].nunique()
    assert fig.axes[0].get_images()[0].get_array().shape == (2, logged)
    fig = plots.divergence_map(runs, x="optim.lr", y="model.placement")
    assert fig.axes[0].get_images()[0].get_array().shape == (2, 2)
    crosses = [line for line in fig.axes[0].get_lines() if line.get_marker() == "x"]
    assert len(crosses) == 2  # lr 1e30 diverged for both placements


def test_report_writes_markdown_html_and_every_figure(study, tmp_path):
    out = tmp_path / "report"
    done = normexp("report", study.out_dir, "--out", str(out))
    assert done.returncode == 0, done.stderr
    files = set(os.listdir(out))
    pngs = {"loss.png", "val_loss.png", "grad_norm_init.png", "grad_norm_final.png",
            "divergence_map.png", *(f"heatmap_{i:02d}.png" for i in range(4))}
    assert files == pngs | {"report.md", "report.html"}
    md = (out / "report.md").read_text()
    assert all(f"]({name})" in md for name in pngs)
    assert "8 runs: 4 completed, 4 diverged" in md
    assert all(r.name in md for r in study.runs)
    html = (out / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == len(pngs)
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = normexp("report", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such run or sweep directory" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
