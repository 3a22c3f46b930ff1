"""Runs as pandas tables: the one reader of run directories, for notebooks, `normexp results`
and `normexp report`.

`load_runs(path)` gives one row per run: its name and directory, its status and summary figures,
and every config key flattened as a column (`model.norm.kind`, `optim.lr`, ...).
`lr_sensitivity(runs)` condenses a learning-rate sweep into Wortsman et al.'s one number per
setup. `load_metrics(path)` gives the metrics in long format, one row per (run, step, metric, value),
every per-layer gradient norm included. `path` is a run directory, a sweep directory, a
directory of runs, or a list of any of these. Runs still in progress are read as they stand: a
truncated last line of `metrics.jsonl` is skipped.
"""

import os

import numpy as np
import pandas as pd

from normexp import rundir
from normexp.errors import UsageError
from normexp.metric_names import GRAD_NORM, LOSS, VAL_LOSS, parse_metric
from normexp.spikes import KEYS as SPIKES  # the spike scores' summary.json keys
from normexp.sweep import read_manifest

SUMMARY_COLUMNS = ("status", "steps", "diverged_step", "final_val_loss", "best_val_loss",
                   *SPIKES, "tokens_per_s", "compile_seconds", "vectorized_runs")
# The results table's figures, after the run's name and the keys its study varied.
TABLE = ("status", "diverged_step", "final_val_loss", "best_val_loss", "max_grad_norm",
         *SPIKES, "tokens_per_s", "steps")
NUMERIC = ("steps", "diverged_step", "final_val_loss", "best_val_loss", *SPIKES,
           "tokens_per_s", "compile_seconds", "vectorized_runs", "max_grad_norm",
           "initial_loss")


def _entries(path, pending=False):
    """[(run_dir, sweep_dir or None, the sweep's overrides or None)] under `path`."""
    if isinstance(path, (list, tuple)):
        return [e for p in path for e in _entries(p, pending)]
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise UsageError(f"{path}: no such run or sweep directory")
    if rundir.is_run(path):
        return [(path, None, None)]
    manifest = read_manifest(path)
    if manifest:  # the sweep's order; runs not started yet have no directory
        found = [(os.path.join(path, r["name"]), path, r["overrides"]) for r in manifest["runs"]]
        return [e for e in found if pending or rundir.is_run(e[0])]
    found = [(os.path.join(path, n), None, None) for n in sorted(os.listdir(path))
             if rundir.is_run(os.path.join(path, n))]
    if not found:
        raise UsageError(f"{path}: holds no runs (no config.yaml in it or in its subdirectories)")
    return found


def run_dirs(path):
    """The run directories under `path` (a run, a sweep, a directory of runs, or a list)."""
    return [d for d, _, _ in _entries(path)]


def _name(run_dir, dirs):
    """A run's label: its directory name, or a longer path tail where names repeat."""
    parts = os.path.normpath(run_dir).split(os.sep)
    for n in range(1, len(parts) + 1):
        tail = "/".join(parts[-n:])
        if sum(os.path.normpath(d).endswith(os.sep + tail) or d == tail for d in dirs) <= 1:
            return tail
    return run_dir


def load_runs(path, pending=False):
    """One row per run: run, run_dir, the summary figures, max_grad_norm, initial_loss (the
    validation loss at initialisation, step 0; the training loss of step 0 where no
    evaluation was logged), every config key.

    With `pending`, a sweep's runs are listed as the sweep sees them: those that have not
    started are rows too (status `pending`, their swept values set and the other config keys
    missing). A run still marked running whose process no longer holds its lock is `stopped`
    (rundir.status).
    """
    entries = _entries(path, pending)
    dirs = [d for d, _, _ in entries]
    rows = []
    for d, _, overrides in entries:
        summary = rundir.read_summary(d)
        row = {"run": _name(d, dirs), "run_dir": os.path.abspath(d)}
        row.update({k: getattr(summary, k) if summary else None for k in SUMMARY_COLUMNS})
        row["status"] = rundir.status(d, probe=True)
        records = rundir.read_metrics(d)
        grad_norms = [r[GRAD_NORM] for r in records if r.get(GRAD_NORM) is not None]
        row["max_grad_norm"] = max(grad_norms, default=None)
        first = next((r for r in records if r.get("step") == 0), {})
        row["initial_loss"] = first.get(VAL_LOSS, first.get(LOSS))
        row.update(rundir.read_config(d) if rundir.is_run(d) else overrides)
        rows.append(row)
    columns = ["run", "run_dir", *SUMMARY_COLUMNS, "max_grad_norm", "initial_loss"]
    frame = pd.DataFrame(rows, columns=columns + sorted({k for r in rows for k in r} -
                                                       set(columns)))
    for column in NUMERIC:
        frame[column] = pd.to_numeric(frame[column])  # missing values: NaN, not None
    return frame.set_index("run", drop=False)


def load_metrics(path):
    """Long-format metrics: run, step, metric, value (NaN where a value was not finite).

    Per-block metrics also get `layer` (the block index) and `family` (the metric with the
    block taken out: `grad_norm/block_03/attn` -> `grad_norm/block/attn`), so that one
    `pivot_table` gives a layer x step grid.
    """
    dirs = run_dirs(path)
    frames = []
    for d in dirs:
        records = rundir.read_metrics(d)
        if not records:
            continue
        long = pd.DataFrame([(r["step"], k, v) for r in records for k, v in r.items()
                             if k != "step"], columns=["step", "metric", "value"])
        long.insert(0, "run", _name(d, dirs))
        frames.append(long)
    if not frames:
        return pd.DataFrame({"run": pd.Series(dtype=str), "step": pd.Series(dtype=int),
                             "metric": pd.Series(dtype=str), "value": pd.Series(dtype=float),
                             "layer": pd.Series(dtype=float), "family": pd.Series(dtype=str)})
    out = pd.concat(frames, ignore_index=True)
    out["value"] = pd.to_numeric(out["value"], errors="coerce").astype(float)  # null: NaN
    parsed = {name: parse_metric(name) for name in out["metric"].unique()}
    out["layer"] = pd.to_numeric(out["metric"].map(lambda name: parsed[name][1]))
    out["family"] = out["metric"].map(lambda name: parsed[name][0])
    return out.sort_values(["run", "metric", "step"], kind="stable").reset_index(drop=True)


def varying_keys(runs, exclude=("run.name", "run.out_dir", "train.compile_cache")):
    """The config keys whose value differs between the runs: what a study varied."""
    keys = [c for c in runs.columns if "." in c and c not in exclude]
    return [k for k in keys if runs[k].astype(str).nunique() > 1]


def clipped_losses(runs, loss="final_val_loss", initial="initial_loss"):
    """(min(loss, initial loss) per run, whether it diverged): a diverged run (status
    diverged, or completed without a finite loss) counts at its initial loss, as in Wortsman
    et al. 2023. Runs that did not finish, or lack their initial loss, are refused by name:
    counting them either way would change the figure."""
    l0 = pd.to_numeric(runs[initial])
    value = pd.to_numeric(runs[loss])
    done = runs["status"].isin([rundir.COMPLETED, rundir.DIVERGED])
    for bad, what in ((~done, "did not finish (status not completed or diverged)"),
                      (l0.isna(), f"have no {initial}")):
        if bad.any():
            names = ", ".join(map(str, list(runs.index[bad])[:3]))
            raise UsageError(f"{int(bad.sum())} run(s) {what}: {names}; finish or drop them")
    diverged = (runs["status"] == rundir.DIVERGED) | ~np.isfinite(value)
    return pd.Series(np.where(diverged, l0, np.fmin(value, l0)), index=runs.index), diverged


def lr_sensitivity(runs, by=None, lr="optim.lr", loss="final_val_loss", initial="initial_loss"):
    """LR sensitivity (Wortsman et al. 2023, sec. 3.1) per setup: E_eta[min(l(eta), l_0) - l*]
    over the learning rates eta a setup was run at, l_0 the loss at initialisation (so a
    diverged or worse-than-init run counts as l_0), l* the best over the range.

    Seeds are averaged first: l(eta) is the mean over a setup's runs at eta of min(loss, l_0),
    a diverged run (status diverged, or no finite loss) counting as l_0. `by`: the keys of a
    setup (default: every key the runs vary but the seed, the learning rate and the names).
    One row per setup: its keys, `lr_sensitivity`, `best_loss` (l*), `best_lr`, `lrs`,
    `diverged` (runs), `runs`.
    """
    if by is None:
        by = [k for k in varying_keys(runs) if k not in ("run.seed", lr)]
    by = [by] if isinstance(by, str) else list(by)
    frame = runs.copy()
    frame["_clipped"], frame["_diverged"] = clipped_losses(runs, loss, initial)
    rows = []
    groups = frame.groupby(by, sort=False, dropna=False) if by else [((), frame)]
    for key, group in groups:
        per_lr = group.groupby(lr)["_clipped"].mean()
        best = float(per_lr.min())
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        row.update(lr_sensitivity=float((per_lr - best).mean()), best_loss=best,
                   best_lr=float(per_lr.idxmin()), lrs=len(per_lr),
                   diverged=int(group["_diverged"].sum()), runs=len(group))
        rows.append(row)
    return pd.DataFrame(rows)
