"""`normexp compare RUN_A RUN_B ...` (runs side by side) and `normexp ls [DIR]` (every run under
a directory). Both only read; `compare --out DIR` writes its figure there and nothing else.
"""

import os
import time

import numpy as np
import pandas as pd

from normexp import analysis, results, rundir
from normexp.errors import UsageError
from normexp.analysis import SPIKES
from normexp.metric_names import GRAD_NORM, VAL_LOSS, family

SIDE_BY_SIDE = ("status", "steps", "final_val_loss", "best_val_loss", *SPIKES, "tokens_per_s")


def _steps(row):
    done, total = row.get("steps"), row.get("train.steps")
    done = "-" if done is None or done != done else int(done)
    return f"{done}/{int(total)}" if total == total and total is not None else str(done)


def table(runs):
    """The config keys that differ, then the summary figures: results' table turned on its
    side, one column per run, steps as done of planned."""
    keys = analysis.varying_keys(runs)
    shown = results.frame(runs, keys, SIDE_BY_SIDE)
    shown["steps"] = runs.apply(_steps, axis=1).to_numpy()
    side = results.cells(shown).set_index("run").T
    side.insert(0, "", list(side.index))
    return side, keys


def profiles(metrics):
    """{run: (per-block gradient norms at the first logged step, at the last)}."""
    rows = metrics[metrics["family"] == family(GRAD_NORM)]
    out = {}
    for run, own in rows.groupby("run", sort=False):
        steps = sorted(own["step"].unique())
        at = lambda step: own[own["step"] == step].sort_values("layer")["value"].to_numpy()
        out[run] = (steps[0], at(steps[0]), steps[-1], at(steps[-1]))
    return out


def compare(paths, out_dir=None):
    """The comparison as text (and, with `out_dir`, compare.png there); returns (text, paths)."""
    if len(paths) < 2:
        raise UsageError("compare: expected at least two runs")
    for path in paths:
        if not rundir.is_run(path):
            raise UsageError(f"{path}: not a run directory (no config.yaml in it)")
    runs = analysis.load_runs(list(paths))
    frame, keys = table(runs)
    lines = [f"{len(runs)} runs; " + (f"they differ in {', '.join(keys)}" if keys
                                       else "their configs are equal")]
    lines.append(results.to_text(frame))
    metrics = analysis.load_metrics(list(paths))
    found = profiles(metrics)
    found = {run: found[run] for run in runs["run"] if run in found}  # in the order given
    if found:
        labels = {run: chr(ord("A") + i) if i < 26 else str(i) for i, run in enumerate(found)}
        lines.append("\ngradient norm per block at each run's first and last logged step ("
                     + ", ".join(f"{labels[run]} = {run}" for run in found) + ")")
        header = ["block"] + [f"{labels[run]}@{first}" for run, (first, *_) in found.items()] + [
            f"{labels[run]}@{last}" for run, (_, _, last, _) in found.items()]
        depth = max(len(p[1]) for p in found.values())
        cells = [[f"{i:02d}"] + [_value(p[1], i) for p in found.values()]
                 + [_value(p[3], i) for p in found.values()] for i in range(depth)]
        widths = [max(len(h), *(len(c[j]) for c in cells)) for j, h in enumerate(header)]
        lines += ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    written = []
    if out_dir:
        written.append(_figure(metrics, runs, found, out_dir))
    return "\n".join(lines), written


def _value(values, i):
    return results.cell(float(values[i])) if i < len(values) and np.isfinite(values[i]) else "-"


def _figure(metrics, runs, found, out_dir):
    from matplotlib.figure import Figure
    from normexp.report import png
    if not found:
        raise UsageError("compare --out: the runs logged no per-block gradient norms "
                         "(log.grad_norms was off)")
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, index, when in ((axes[0], 0, "first"), (axes[1], 2, "last")):
        for run, profile in found.items():
            ax.plot(range(len(profile[index + 1])), profile[index + 1], marker="o",
                    label=f"{run} (step {profile[index]})")
        ax.set(title=f"Gradient norm per block, {when} logged step", xlabel="block",
               ylabel="gradient L2 norm (log scale)", yscale="log")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3, which="both")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "compare.png")
    rundir.write_atomic(path, png(fig))
    return path


def find_runs(path):
    """Every run directory under `path` (itself included), not looking inside runs."""
    if not os.path.isdir(path):
        raise UsageError(f"{path}: no such directory")
    found = []
    for root, dirs, _ in os.walk(path):
        if rundir.is_run(root):
            found.append(root)
            dirs[:] = []
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return found


def _age(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def listing(path, now=None):
    """`normexp ls`: run, status, step/steps, val loss, the spike scores, age (since its last
    write)."""
    now = time.time() if now is None else now
    rows = []
    for d in find_runs(path):
        summary, config = rundir.read_summary(d), rundir.read_config(d)
        done, final = (summary.steps, summary.final_val_loss) if summary else (None, None)
        records = rundir.read_metrics(d)
        vals = [r[VAL_LOSS] for r in records if r.get(VAL_LOSS) is not None]
        latest = max(os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d))
        rows.append({"run": os.path.relpath(d, path) if d != path else os.path.basename(d),
                     "status": rundir.status(d, probe=True),
                     "steps": _steps({"steps": done, "train.steps": config.get("train.steps")}),
                     "val_loss": final if final is not None else vals[-1] if vals else None,
                     **{k: getattr(summary, k) if summary else None for k in SPIKES},
                     "age": _age(now - latest)})
    return pd.DataFrame(rows, columns=["run", "status", "steps", "val_loss", *SPIKES, "age"])
