"""Figures of runs, each a matplotlib `Figure` built from the tables of `normexp.analysis`.

- `loss_curves`: a loss over steps, one line per setup (mean over seeds, band = min..max);
- `grad_norm_by_layer`: gradient norm against block index at one step (0 = initialisation),
  one line per setup;
- `grad_norm_heatmap`: one run's per-block gradient norm, block x step;
- `divergence_map`: a grid of two config keys (e.g. learning rate x placement), colour = final
  loss, a cross where runs diverged;
- `loss_vs_lr`: final loss against the learning rate, a line per size, a panel per setting
  (Wortsman et al. 2023, Fig. 1), diverged runs marked;
- `expected_gradients`: claim 1's numbers as Xiong et al. 2020's Fig. 3, the FFN's expected
  gradient per block and the last block's against depth.
- `depth_profiles`: claims 9-10's numbers, per block: output variance, pruning damage, angular
  distance, a line per placement.
- `saturation_curves`: claim 12's saturated share of DyT's inputs over training, per alpha0.

A *setup* is a group of runs that share the values of the `by` keys (by default every key the
runs vary except the seed), so seeds are averaged. Figures are made without pyplot, so nothing
accumulates in a long notebook or report.
"""

import math
import textwrap

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.ticker import NullFormatter
from matplotlib.figure import Figure

from normexp.analysis import clipped_losses, varying_keys
from normexp.metric_names import GRAD_NORM, LOSS, VAL_LOSS, family
from normexp.rundir import DIVERGED
from normexp.sweep import short_names


def setup_keys(runs, by=None):
    """The keys that define a setup: `by` (a key or a list), else what varies but the seed."""
    if by is None:
        return [k for k in varying_keys(runs) if k != "run.seed"]
    return [by] if isinstance(by, str) else list(by)


def setups(runs, by=None):
    """[(label, [run names])] in order of first appearance; the label names the key values."""
    keys = setup_keys(runs, by)
    short = short_names(keys)
    groups = {}
    for name, row in runs.iterrows():
        label = ", ".join(f"{short[k]}={_text(row[k])}" for k in keys) or "all runs"
        groups.setdefault(label, []).append(name)
    return list(groups.items())


def _text(value):
    return format(value, "g") if isinstance(value, float) else str(value)


def _figure(width=6.4, height=4.2):
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _title(ax, text, width=70):
    """Titles name setups and runs, which can be long: wrap them rather than cut them off."""
    ax.set_title(textwrap.fill(text, width), fontsize="medium")


def loss_curves(metrics, runs, by=None, metric=LOSS):
    """`metric` (loss, val_loss) over steps, one line per setup: the mean over its runs, with
    their min..max as a band. Runs that diverged stop where they diverged."""
    fig, ax = _figure()
    values = metrics[metrics["metric"] == metric].pivot_table(
        index="step", columns="run", values="value", dropna=False)
    for label, names in setups(runs, by):
        present = [n for n in names if n in values.columns]
        if not present:
            continue
        group = values[present].replace([np.inf, -np.inf], np.nan)
        finite = group.dropna(how="all")
        diverged = sum(runs.loc[n, "status"] == DIVERGED for n in names)
        note = f" ({diverged} of {len(names)} diverged)" if diverged else ""
        line, = ax.plot(finite.index, finite.mean(axis=1), label=label + note)
        if len(present) > 1:
            ax.fill_between(finite.index, finite.min(axis=1), finite.max(axis=1),
                            color=line.get_color(), alpha=0.2, linewidth=0)
    what = "validation loss" if metric == VAL_LOSS else "training loss"
    _title(ax, f"{what.capitalize()} by {', '.join(setup_keys(runs, by)) or 'run'}")
    ax.set(xlabel="step", ylabel=f"{what} (nats/token)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def _nearest_step(metrics, family, step):
    steps = np.unique(metrics.loc[metrics["family"] == family, "step"])
    if not len(steps):
        raise ValueError(f"no {family!r} metrics in these runs (log.grad_norms off?)")
    return int(steps[np.argmin(np.abs(steps - step))])


def grad_norm_by_layer(metrics, runs, step=0, by=None, part=None):
    """Gradient norm per block at `step` (the nearest logged step), one line per setup (mean
    over its runs); `part` = attn | mlp | norm for one sublayer's parameters only."""
    name = family(GRAD_NORM, part)
    at = _nearest_step(metrics, name, step)
    rows = metrics[(metrics["family"] == name) & (metrics["step"] == at)]
    values = rows.pivot_table(index="layer", columns="run", values="value")
    fig, ax = _figure()
    for label, names in setups(runs, by):
        present = [n for n in names if n in values.columns]
        if present:
            ax.plot(values.index.astype(int), values[present].mean(axis=1), marker="o",
                    label=label)
    when = "at initialisation" if at == 0 else f"at step {at}"
    _title(ax, f"Gradient norm per block {when}" + (f" ({part})" if part else ""))
    ax.set(xlabel="block (0 = nearest the embeddings)", ylabel="gradient L2 norm (log scale)",
           yscale="log")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, which="both")
    return fig


def grad_norm_heatmap(metrics, run, part=None):
    """One run's gradient norm per block (rows) and logged step (columns), log colour scale."""
    name = family(GRAD_NORM, part)
    rows = metrics[(metrics["run"] == run) & (metrics["family"] == name)]
    if rows.empty:
        raise ValueError(f"run {run!r} has no {name!r} metrics")
    grid = rows.pivot_table(index="layer", columns="step", values="value", dropna=False)
    data = grid.to_numpy(dtype=float)
    positive = data[np.isfinite(data) & (data > 0)]
    fig, ax = _figure(7.2, 3.6)
    norm = LogNorm(positive.min(), positive.max()) if len(positive) else None
    image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", origin="lower",
                      interpolation="nearest", norm=norm, cmap="viridis",
                      extent=(grid.columns[0] - 0.5, grid.columns[-1] + 0.5, -0.5,
                              len(grid.index) - 0.5))
    fig.colorbar(image, ax=ax, label="gradient L2 norm")
    _title(ax, f"Gradient norm per block over training: {run}")
    ax.set(xlabel="step", ylabel="block")
    ax.yaxis.get_major_locator().set_params(integer=True)
    return fig


def divergence_map(runs, x="optim.lr", y="model.placement", value="final_val_loss"):
    """A cell per (y, x) value pair: colour = mean `value` over its runs that finished, a cross
    where every run diverged, 'k/n div.' where some did."""
    xs, ys = sorted(runs[x].dropna().unique(), key=_order), sorted(
        runs[y].dropna().unique(), key=_order)
    mean = np.full((len(ys), len(xs)), np.nan)
    fig, ax = _figure(max(6.4, 3.5 + 1.3 * len(xs)), 1.8 + 0.7 * len(ys))
    marks = []
    for i, yv in enumerate(ys):
        for j, xv in enumerate(xs):
            cell = runs[(runs[y] == yv) & (runs[x] == xv)]
            finite = cell[cell["status"] != DIVERGED][value].dropna()
            diverged = int((cell["status"] == DIVERGED).sum())
            if len(finite):
                mean[i, j] = finite.mean()
            marks.append((i, j, diverged, len(cell), mean[i, j]))
    image = ax.imshow(np.ma.masked_invalid(mean), cmap="viridis_r", aspect="auto",
                      origin="lower")
    ax.set_facecolor("0.85")  # cells with no finished run
    fig.colorbar(image, ax=ax, label=f"{value.replace('_', ' ')} (nats/token)")
    for i, j, diverged, count, v in marks:
        if count and diverged == count:
            ax.plot(j, i, marker="x", color="crimson", markersize=18, markeredgewidth=3)
            continue
        text = f"{v:.3f}" if math.isfinite(v) else "-"
        if diverged:
            text += f"\n{diverged}/{count} div."
        dark = math.isfinite(v) and image.norm(v) > 0.6  # the dark end of viridis_r
        ax.text(j, i, text, ha="center", va="center", fontsize="small",
                color="crimson" if diverged else "white" if dark else "black")
    ax.set_xticks(range(len(xs)), [_text(v) for v in xs])
    ax.set_yticks(range(len(ys)), [_text(v) for v in ys])
    crossed = any(count and diverged == count for _, _, diverged, count, _ in marks)
    _title(ax, value.replace('_', ' ').capitalize()
           + (" (x: every run of the cell diverged)" if crossed else ""), 60)
    ax.set(xlabel=x, ylabel=y)
    return fig


def loss_vs_lr(runs, line=None, panel=None, title="", lr="optim.lr", loss="final_val_loss"):
    """Final loss against the learning rate (log axis), one line per `line` value (a size),
    one panel per `panel` value (a setting such as model.qk_norm): the mean over seeds of
    min(loss, initial loss), a diverged run counted at its initial loss and marked with a
    cross, as in Wortsman et al. 2023, Fig. 1."""
    clipped, diverged = clipped_losses(runs, loss)
    runs = runs.assign(_clipped=clipped, _diverged=diverged)
    panels = sorted(runs[panel].unique(), key=_order) if panel else [None]
    fig = Figure(figsize=(1.5 + 3.6 * len(panels), 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, value in zip(axes, panels):
        here = runs if value is None else runs[runs[panel] == value]
        for size in sorted(here[line].unique(), key=_order) if line else [None]:
            mine = here if size is None else here[here[line] == size]
            mean = mine.groupby(lr)["_clipped"].mean().sort_index()
            (drawn,) = ax.plot(mean.index, mean.values, marker="o", markersize=4,
                               label=f"{line}={_text(size)}" if line else loss)
            bad = mine[mine["_diverged"]]
            ax.plot(bad[lr], bad["_clipped"], "x", color=drawn.get_color(), markersize=9,
                    markeredgewidth=2)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # a range under a decade labels them all
        ax.set(xlabel=lr, title=f"{panel}={_text(value)}" if panel else "")
    axes[0].set_ylabel(f"{loss.replace('_', ' ')} (x: diverged, at the initial loss)")
    axes[-1].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def _order(value):
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def expected_gradients(profiles, last, depth):
    """Xiong et al. 2020, Fig. 3 from `studies.measure_expected_gradients`: ||E[grad W2]|| per
    block at `depth` blocks and at the smallest depth, dashed (a/b), and the last block's
    against the depth L, log-log, with the slopes of Theorem 1 drawn through the first depth
    (c/d). Lines: the mean over seeds, bands: their range."""
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    by_block, by_depth = fig.subplots(1, 2)
    for placement, slope in (("pre", -0.5), ("post", 0.0)):
        label = f"{placement.capitalize()}-LN"
        depths = sorted(last[placement], key=int)
        line = None
        for L in dict.fromkeys([depth, depths[0]]):
            rows = np.array(profiles[placement][L]["w2"], float)  # [seed, block]
            blocks = np.arange(1, rows.shape[1] + 1)
            (line,) = by_block.plot(blocks, rows.mean(0), "-" if L == depth else "--",
                                    marker="o", markersize=4, label=f"{label}, {L} blocks",
                                    color=line.get_color() if line else None)
            by_block.fill_between(blocks, rows.min(0), rows.max(0), alpha=0.2,
                                  color=line.get_color())
        values = np.array([last[placement][L] for L in depths], float)  # [depth, seed]
        L = np.array([int(d) for d in depths], float)
        by_depth.plot(L, values.mean(1), marker="o", markersize=4, color=line.get_color(),
                      label=label)
        by_depth.fill_between(L, values.min(1), values.max(1), alpha=0.2,
                              color=line.get_color())
        by_depth.plot(L, values.mean(1)[0] * (L / L[0]) ** slope, "--", color=line.get_color(),
                      label=f"Theorem 1: L^{slope:g}")
    by_block.set(xlabel="block", ylabel="||E[grad W2]||_F", yscale="log",
                 title="FFN W2 per block")
    by_depth.set(xlabel="depth L", ylabel="last block's ||E[grad W2]||_F", xscale="log",
                 yscale="log", title="Last block's W2 against depth")
    by_block.legend(fontsize="small")
    by_depth.legend(fontsize="small")
    return fig


def depth_profiles(profiles, title=""):
    """Claims 9-10 from `depth_study.measure_depth`: per block, each placement's output
    variance (log), the val-loss damage of skipping the block, and the angular distance across
    it (Sun et al. 2025, Figs. 1 and 4; Li et al. 2024, Fig. 3). Lines: the mean over seeds,
    bands: their range; a placement with a seed unmeasured (diverged) is left out."""
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    labels = {"var": "output variance", "damage": "val loss increase when skipped (nats)",
              "angular": "angular distance across the block"}
    for ax, (key, label) in zip(fig.subplots(1, 3), labels.items()):
        for placement, by_key in profiles.items():
            seeds = by_key.get(key) or []
            if not seeds or any(s is None for s in seeds):
                continue
            rows = np.array(seeds, float)  # [seed, block]
            blocks = np.arange(1, rows.shape[1] + 1)
            (line,) = ax.plot(blocks, rows.mean(0), marker="o", markersize=3, label=placement)
            ax.fill_between(blocks, rows.min(0), rows.max(0), alpha=0.2, color=line.get_color())
        ax.set(xlabel="block", ylabel=label, yscale="log" if key == "var" else "linear")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def saturation_curves(curves, title=""):
    """Claim 12 from `dyt_study.measure_dyt`: the share of DyT's inputs in saturation (|alpha x|
    > 2, mean over the blocks' norms and the seeds) over training, one line per alpha0, one
    panel per width x depth."""
    cells = sorted(curves, key=lambda c: tuple(int(v) for v in c.split("x")))
    fig = Figure(figsize=(1.5 + 3.2 * len(cells), 3.4), layout="constrained")
    axes = fig.subplots(1, len(cells), sharey=True, squeeze=False)[0]
    for ax, cell in zip(axes, cells):
        for alpha, points in curves[cell].items():
            steps, values = zip(*points) if points else ((), ())
            ax.plot(steps, values, label=f"alpha0={_text(alpha)}")
        width, depth = cell.split("x")
        ax.set(xlabel="step", title=f"width {width} x {depth} blocks", ylim=(0, 1))
    axes[0].set_ylabel("saturated share of DyT inputs")
    axes[-1].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig
