import pytest

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
    assert "(x: every run of the cell diverged)" in fig.axes[0].get_title()
    calm = plots.divergence_map(runs[runs["optim.lr"] == 3e-3], x="optim.lr",
                                y="model.placement")
    assert "diverged" not in calm.axes[0].get_title()  # nothing diverged: no legend for crosses


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
    assert plots.loss_vs_lr(runs, title="placement=pre")._suptitle.get_text() == "placement=pre"


def test_expected_gradients_draws_the_profiles_and_the_depth_slopes():
    seeds = [[4.0, 2.0, 1.0], [5.0, 2.5, 1.5]]  # [seed, block] at 3 blocks
    profiles = {p: {2: {"w2": [row[:2] for row in seeds]}, 3: {"w2": seeds}}
                for p in ("pre", "post")}
    last = {p: {2: [1.0, 1.2], 3: [0.8, 0.9]} for p in ("pre", "post")}
    by_block, by_depth = plots.expected_gradients(profiles, last, 3).axes
    means = [line.get_ydata().tolist() for line in by_block.get_lines()]
    assert means[:2] == [[4.5, 2.25, 1.25], [4.5, 2.25]]  # 3 blocks, then 2 (dashed)
    assert by_depth.get_xscale() == by_depth.get_yscale() == "log"
    theorem = by_depth.get_lines()[1]  # Pre-LN's L^-1/2 through its first depth
    assert theorem.get_ydata()[-1] == pytest.approx(1.1 * (3 / 2) ** -0.5)


def test_depth_profiles_draw_each_placements_mean_and_leave_out_an_unmeasured_one():
    seeds = [[1.0, 2.0, 4.0], [3.0, 4.0, 6.0]]  # [seed, block]
    profiles = {"pre": {k: seeds for k in ("var", "damage", "angular")},
                "lns": {k: [seeds[0], None] for k in ("var", "damage", "angular")}}
    axes = plots.depth_profiles(profiles, "title").axes
    assert [ax.get_yscale() for ax in axes] == ["log", "linear", "linear"]
    for ax in axes:
        (line,) = ax.get_lines()  # lns has a diverged seed: not drawn
        assert line.get_label() == "pre" and line.get_ydata().tolist() == [2.0, 3.0, 5.0]


def test_saturation_curves_draw_a_line_per_alpha_and_a_panel_per_cell():
    curves = {"64x4": {0.2: [(0, 0.0), (10, 0.1)], 5.0: [(0, 0.5), (10, 0.9)]},
              "32x2": {0.2: [(0, 0.0), (10, 0.05)], 5.0: [(0, 0.4), (10, 0.8)]}}
    axes = plots.saturation_curves(curves).axes
    assert [ax.get_title() for ax in axes] == ["width 32 x 2 blocks", "width 64 x 4 blocks"]
    assert [line.get_ydata().tolist() for line in axes[1].get_lines()] == [[0.0, 0.1],
                                                                           [0.5, 0.9]]
