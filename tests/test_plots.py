from normexp import analysis, plots


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


def test_loss_vs_lr_draws_a_line_per_size_a_panel_per_setting_and_marks_divergence(study):
    runs = analysis.load_runs(study.out_dir)
    fig = plots.loss_vs_lr(runs, line="model.placement")
    ax = fig.axes[0]
    curves = [line for line in ax.get_lines() if line.get_marker() == "o"]
    crosses = [line for line in ax.get_lines() if line.get_marker() == "x"]
    assert len(curves) == 2 and all(len(c.get_xdata()) == 2 for c in curves)
    assert sum(len(c.get_xdata()) for c in crosses) == 4  # lr 1e30: 2 placements x 2 seeds
    assert ax.get_xscale() == "log"
    assert len(plots.loss_vs_lr(runs, panel="model.placement").axes) == 2
