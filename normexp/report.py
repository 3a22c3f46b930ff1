"""`normexp report`: a readable account of a set of runs, as report.md, report.html (images
embedded) and PNG figures, written atomically into one directory."""

import base64
import html
import io
import os

import numpy as np

from normexp import plots, results
from normexp.analysis import load_metrics, load_runs, lr_sensitivity
from normexp.errors import UsageError
from normexp.metric_names import GRAD_NORM, LOSS, VAL_LOSS, family
from normexp.rundir import DIVERGED, FINISHED, PENDING, write_atomic
MAX_HEATMAPS = 8


def default_out(path):
    return os.path.join(path[0] if isinstance(path, (list, tuple)) else path, "report")


DPI = 110


def png(fig, dpi=DPI, format="png"):
    """A figure as PNG bytes (or `format`'s: pdf, svg)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=format, dpi=dpi)
    return buffer.getvalue()


def figures(runs, metrics):
    """[(file name, title, caption, Figure)] for what these runs logged."""
    out = []
    keys = plots.setup_keys(runs)
    families = set(metrics["family"]) if len(metrics) else set()
    if LOSS in families:
        out.append(("loss.png", "Training loss", "Mean over seeds, band from the lowest to the "
                    "highest seed; a run that diverged stops at its divergence.",
                    plots.loss_curves(metrics, runs)))
    if VAL_LOSS in families:
        out.append(("val_loss.png", "Validation loss", "Evaluated every train.eval_every steps "
                    "on fixed validation windows.",
                    plots.loss_curves(metrics, runs, metric=VAL_LOSS)))
    grad_norms = family(GRAD_NORM)
    if grad_norms in families:
        out.append(("grad_norm_init.png", "Gradient norm per block at initialisation",
                    "Step 0, before any update: how the gradient reaching each block depends on "
                    "its depth (Xiong et al. 2020: growing toward the last blocks under "
                    "Post-Norm, flat or shrinking under Pre-Norm).",
                    plots.grad_norm_by_layer(metrics, runs, step=0)))
        last = int(metrics.loc[metrics["family"] == grad_norms, "step"].max())
        out.append(("grad_norm_final.png", f"Gradient norm per block at step {last}",
                    "The same profile at the last logged step.",
                    plots.grad_norm_by_layer(metrics, runs, step=last)))
        logged = set(metrics.loc[metrics["family"] == grad_norms, "run"])
        for i, (label, names) in enumerate(plots.setups(runs)[:MAX_HEATMAPS]):
            run = next((n for n in names if n in logged), None)
            if run is not None:
                out.append((f"heatmap_{i:02d}.png", f"Gradient norm over training: {label}",
                            f"Run {run}: one row per block, one column per logged step, log "
                            f"colour scale.", plots.grad_norm_heatmap(metrics, run)))
    out += _lr_figures(runs, metrics, keys)
    finished = runs["final_val_loss"].notna() | (runs["status"] == DIVERGED)
    if len(keys) >= 2 and finished.any():
        x = "optim.lr" if "optim.lr" in keys else keys[-1]
        setup = {n: label for label, names in plots.setups(runs, [k for k in keys if k != x])
                 for n in names}
        grid = runs.assign(setup=runs.index.map(setup))
        # only a grid whose setups each span several x values: where x and the setup vary
        # together (placement and final_norm) it would be a half-empty diagonal
        if grid.groupby("setup")[x].nunique().min() > 1:
            out.append(("divergence_map.png", f"Final validation loss by {x} and setup",
                        "Each cell is the mean over seeds of the runs that finished; a cross "
                        "marks a cell where every run diverged, 'k/n div.' one where some did.",
                        plots.divergence_map(grid, x=x, y="setup")))
    return out


def _lr_figures(runs, metrics, keys, lr="optim.lr"):
    """For a learning-rate sweep whose runs all finished: final loss vs lr per setup with its
    LR sensitivity (Wortsman et al. 2023, Fig. 1), and the max attention logit over training at
    the highest lr, where it was logged, its caption giving the measured values."""
    if lr not in keys or runs[lr].nunique() < 3 or runs["initial_loss"].isna().any() or not \
            runs["status"].isin(FINISHED).all():
        return []
    rest = [k for k in keys if k != lr]
    groups = lambda ks: runs.groupby(ks, dropna=False).ngroups
    # drop a key the others determine (final_norm beside placement): fewest values first,
    # booleans first among equals
    for k in sorted(rest, key=lambda k: (runs[k].nunique(dropna=False), runs[k].dtype != bool)):
        if len(rest) > 1 and groups([r for r in rest if r != k]) == groups(rest):
            rest.remove(k)
    line = next((k for k in ("model.d_model", "model.n_layer") if k in rest), None)
    panel = min((k for k in rest if k != line), key=lambda k: runs[k].nunique(), default=None)
    others = [k for k in rest if k not in (line, panel)]
    out, logits = [], metrics[metrics["family"] == family("attn", "logit_max")]
    peak = logits.groupby(["run", "step"], as_index=False)["value"].max().assign(
        metric="logit_max")
    for i, (label, names) in enumerate(plots.setups(runs, others)[:MAX_HEATMAPS] if others
                                       else [("", list(runs.index))]):
        mine = runs.loc[names]
        sens = lr_sensitivity(mine, by=[k for k in (line, panel) if k])
        text = "; ".join(" ".join(f"{k.split('.')[-1]}={row[k]}" for k in (line, panel) if k) +
                         f": {row['lr_sensitivity']:.3f}" for _, row in sens.iterrows())
        suffix = f": {label}" if label else ""
        out.append((f"loss_vs_lr_{i:02d}.png", "Final loss vs learning rate" + suffix,
                    "Mean over seeds of min(final val loss, loss at init); a cross marks a "
                    "diverged run, counted at its initial loss. LR sensitivity E_lr[min(loss, "
                    f"loss_0) - loss*]: {text}.", plots.loss_vs_lr(mine, line, panel, label)))
        if not len(peak):
            continue
        top = mine[mine[lr] == mine[lr].max()]
        top = top[top[line] == top[line].max()] if line else top
        fig = plots.loss_curves(peak, top, by=[panel] if panel else None, metric="logit_max")
        where = f"{lr}={top[lr].iloc[0]:g}" + (f", {line}={top[line].iloc[0]}" if line else "")
        fig.axes[0].set(yscale="log", ylabel="max attention logit (max over blocks)",
                        title=f"Max attention logit{suffix} ({where})")
        lines = "; ".join(f"{label}: {text}" for label, text in
                          _curve_summary(peak, top, [panel] if panel else None, "logit_max"))
        out.append((f"logit_max_{i:02d}.png", f"Max attention logit over training{suffix}",
                    f"At {where}: the largest pre-softmax attention logit of any block (the "
                    "quantity of Wortsman et al. 2023), mean over seeds with their range. "
                    f"Measured, as the mean over seeds: {lines}.", fig))
    return out


def _curve_summary(metrics, runs, by, metric):
    """[(label, text)] for each line plots.loss_curves(metrics, runs, by, metric) draws: the
    mean over the setup's runs (the plotted line) at its first logged step, at its peak and at
    its last step, so that a caption states what was measured rather than what was expected."""
    values = metrics[metrics["metric"] == metric].pivot_table(
        index="step", columns="run", values="value", dropna=False)
    out = []
    for label, names in plots.setups(runs, by):
        present = [n for n in names if n in values.columns]
        if not present:
            continue
        mean = values[present].replace([np.inf, -np.inf], np.nan).mean(axis=1).dropna()
        if mean.empty:
            out.append((label, "no finite value logged"))
            continue
        first, top, last = mean.index[0], mean.idxmax(), mean.index[-1]
        out.append((label, f"{mean[first]:.4g} at step {first} (the first logged), peak "
                           f"{mean[top]:.4g} at step {top}, {mean[last]:.4g} at step {last} "
                           "(the last)"))
    return out


def _table_keys(runs):
    """The keys the runs table shows: those the figures group by, then the seed."""
    keys = [k for k in plots.setup_keys(runs) + ["run.seed"] if k in runs.columns]
    return list(dict.fromkeys(k for k in keys if runs[k].astype(str).nunique() > 1))


def status_line(runs):
    """'8 runs: 5 completed, 3 pending': every run, those not started or not finished too."""
    counts = runs["status"].value_counts()
    return f"{len(runs)} runs: " + ", ".join(f"{n} {status}" for status, n in counts.items())


def markdown(title, counts, made, header, rows):
    lines = [f"# {title}", "", counts, ""]
    for name, heading, caption, _ in made:
        lines += [f"## {heading}", "", f"![{heading}]({name})", "", caption, ""]
    lines += ["## Runs", "", "| " + " | ".join(header) + " |",
              "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_html(title, counts, made, images, header, rows):
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             "</title><style>body{font-family:sans-serif;max-width:980px;margin:2em auto}"
             "table{border-collapse:collapse;font-size:small}td,th{border:1px solid #ccc;"
             "padding:2px 6px}img{max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p>{html.escape(counts)}</p>"]
    for name, heading, caption, _ in made:
        data = base64.b64encode(images[name]).decode()  # the PNG
        parts.append(f"<h2>{html.escape(heading)}</h2><img alt='{html.escape(heading)}' "
                     f"src='data:image/png;base64,{data}'><p>{html.escape(caption)}</p>")
    parts.append("<h2>Runs</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>"
                                                      for h in header) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
    parts.append("</table></body></html>\n")
    return "".join(parts)


def write_report(path, out_dir=None, dpi=DPI, format="png"):
    """Write report.md, report.html and the figures for the runs at `path` (PNGs at `dpi`, and
    each figure also as PDF or SVG with that `format`); returns the paths."""
    every = load_runs(path, pending=True)  # a sweep's runs not started yet are counted too
    runs = every[every["status"] != PENDING]
    if runs.empty:
        raise UsageError(f"{path}: no runs to report on yet ({status_line(every)})")
    metrics = load_metrics(path)
    out_dir = out_dir or default_out(path)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out {out_dir}: is a file, not a directory")
    os.makedirs(out_dir, exist_ok=True)
    made = figures(runs, metrics)
    images = {name: png(fig, dpi) for name, _, _, fig in made}
    if format != "png":  # vector versions beside the PNGs the pages show
        images.update({name[:-len(".png")] + f".{format}": png(fig, dpi, format)
                       for name, _, _, fig in made})
    header, rows = results.rows(results.frame(runs, _table_keys(runs)))
    title = f"normexp report: {os.path.basename(os.path.normpath(str(path)))}"
    written = []
    for name, content in images.items():
        written.append(os.path.join(out_dir, name))
        write_atomic(written[-1], content)
    counts = status_line(every)
    for name, content in (("report.md", markdown(title, counts, made, header, rows)),
                          ("report.html", to_html(title, counts, made, images, header, rows))):
        written.append(os.path.join(out_dir, name))
        write_atomic(written[-1], content)
    return written
