"""`normexp report`: a readable account of a set of runs, as report.md, report.html (images
embedded) and PNG figures, written atomically into one directory."""

import base64
import html
import io
import math
import os

from normexp import plots
from normexp.analysis import TABLE, load_metrics, load_runs
from normexp.errors import UsageError
from normexp.rundir import DIVERGED, family, write_atomic
MAX_HEATMAPS = 8


def default_out(path):
    return os.path.join(path[0] if isinstance(path, (list, tuple)) else path, "report")


def _png(fig):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _cell(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def figures(runs, metrics):
    """[(file name, title, caption, Figure)] for what these runs logged."""
    out = []
    keys = plots.setup_keys(runs)
    families = set(metrics["family"]) if len(metrics) else set()
    if "loss" in families:
        out.append(("loss.png", "Training loss", "Mean over seeds, band from the lowest to the "
                    "highest seed; a run that diverged stops at its divergence.",
                    plots.loss_curves(metrics, runs)))
    if "val_loss" in families:
        out.append(("val_loss.png", "Validation loss", "Evaluated every train.eval_every steps "
                    "on fixed validation windows.",
                    plots.loss_curves(metrics, runs, metric="val_loss")))
    grad_norms = family("grad_norm")
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
    finished = runs["final_val_loss"].notna() | (runs["status"] == DIVERGED)
    if len(keys) >= 2 and finished.any():
        x = "optim.lr" if "optim.lr" in keys else keys[-1]
        setup = {n: label for label, names in plots.setups(runs, [k for k in keys if k != x])
                 for n in names}
        grid = runs.assign(setup=runs.index.map(setup))
        out.append(("divergence_map.png", f"Final validation loss by {x} and setup",
                    "Each cell is the mean over seeds of the runs that finished; a cross marks "
                    "a cell where every run diverged, 'k/n div.' one where some did.",
                    plots.divergence_map(grid, x=x, y="setup")))
    return out


def table(runs):
    """The runs table as (header, rows of text)."""
    keys = [k for k in plots.setup_keys(runs) + ["run.seed"] if k in runs.columns]
    keys = list(dict.fromkeys(k for k in keys if runs[k].astype(str).nunique() > 1))
    header = ["run", *keys, *TABLE]
    rows = [[_cell(row[c]) for c in header] for _, row in runs.iterrows()]
    return header, rows


def _status_line(runs):
    counts = runs["status"].value_counts()
    return f"{len(runs)} runs: " + ", ".join(f"{n} {status}" for status, n in counts.items())


def markdown(title, runs, made, header, rows):
    lines = [f"# {title}", "", _status_line(runs), ""]
    for name, heading, caption, _ in made:
        lines += [f"## {heading}", "", f"![{heading}]({name})", "", caption, ""]
    lines += ["## Runs", "", "| " + " | ".join(header) + " |",
              "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_html(title, runs, made, images, header, rows):
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             "</title><style>body{font-family:sans-serif;max-width:980px;margin:2em auto}"
             "table{border-collapse:collapse;font-size:small}td,th{border:1px solid #ccc;"
             "padding:2px 6px}img{max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p>{html.escape(_status_line(runs))}</p>"]
    for name, heading, caption, _ in made:
        data = base64.b64encode(images[name]).decode()
        parts.append(f"<h2>{html.escape(heading)}</h2><img alt='{html.escape(heading)}' "
                     f"src='data:image/png;base64,{data}'><p>{html.escape(caption)}</p>")
    parts.append("<h2>Runs</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>"
                                                      for h in header) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
    parts.append("</table></body></html>\n")
    return "".join(parts)


def write_report(path, out_dir=None):
    """Write report.md, report.html and the figures for the runs at `path`; returns the paths."""
    runs = load_runs(path)
    if runs.empty:
        raise UsageError(f"{path}: no runs to report on yet")
    metrics = load_metrics(path)
    out_dir = out_dir or default_out(path)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out {out_dir}: is a file, not a directory")
    os.makedirs(out_dir, exist_ok=True)
    made = figures(runs, metrics)
    images = {name: _png(fig) for name, _, _, fig in made}
    header, rows = table(runs)
    title = f"normexp report: {os.path.basename(os.path.normpath(str(path)))}"
    written = []
    for name, content in images.items():
        written.append(os.path.join(out_dir, name))
        write_atomic(written[-1], content)
    for name, content in (("report.md", markdown(title, runs, made, header, rows)),
                          ("report.html", to_html(title, runs, made, images, header, rows))):
        written.append(os.path.join(out_dir, name))
        write_atomic(written[-1], content)
    return written
