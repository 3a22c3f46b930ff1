"""Runs as pandas tables, for notebooks and `normexp report`.

`load_runs(path)` gives one row per run: its name and directory, its status and summary figures,
and every config key flattened as a column (`model.norm.kind`, `optim.lr`, ...).
`load_metrics(path)` gives the metrics in long format, one row per (run, step, metric, value),
every per-layer gradient norm included. `path` is a run directory, a sweep directory, a
directory of runs, or a list of any of these. Runs still in progress are read as they stand: a
truncated last line of `metrics.jsonl` is skipped.
"""

import os
import re

import pandas as pd

from normexp import config as config_lib
from normexp.errors import UsageError
from normexp.tracking import read_json, read_metrics

SUMMARY_COLUMNS = ("status", "steps", "diverged_step", "final_val_loss", "best_val_loss",
                   "tokens_per_s", "compile_seconds", "vectorized_runs")
BLOCK = re.compile(r"^(?P<prefix>.*)/block_(?P<index>\d+)(?P<part>/.*)?$")


def run_dirs(path):
    """The run directories under `path` (a run, a sweep, a directory of runs, or a list)."""
    if isinstance(path, (list, tuple)):
        return [d for p in path for d in run_dirs(p)]
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise UsageError(f"{path}: no such run or sweep directory")
    if os.path.isfile(os.path.join(path, "config.yaml")):
        return [path]
    manifest = read_json(os.path.join(path, "sweep.json"))
    if manifest:  # the sweep's order; runs not started yet have no directory
        names = [r["name"] for r in manifest["runs"]]
    else:
        names = sorted(os.listdir(path))
    found = [os.path.join(path, n) for n in names
             if os.path.isfile(os.path.join(path, n, "config.yaml"))]
    if not found and not manifest:
        raise UsageError(f"{path}: holds no runs (no config.yaml in it or in its subdirectories)")
    return found


def _name(run_dir, dirs):
    """A run's label: its directory name, or a longer path tail where names repeat."""
    parts = os.path.normpath(run_dir).split(os.sep)
    for n in range(1, len(parts) + 1):
        tail = "/".join(parts[-n:])
        if sum(os.path.normpath(d).endswith(os.sep + tail) or d == tail for d in dirs) <= 1:
            return tail
    return run_dir


def load_runs(path):
    """One row per run: run, run_dir, the summary figures, max_grad_norm, every config key."""
    dirs = run_dirs(path)
    rows = []
    for d in dirs:
        summary = read_json(os.path.join(d, "summary.json")) or {}
        flat = config_lib.flatten(config_lib.read_yaml(os.path.join(d, "config.yaml")))
        grad_norms = [r["grad_norm"] for r in read_metrics(os.path.join(d, "metrics.jsonl"))
                      if r.get("grad_norm") is not None]
        row = {"run": _name(d, dirs), "run_dir": os.path.abspath(d)}
        row.update({k: summary.get(k) for k in SUMMARY_COLUMNS})
        row["status"] = row["status"] or "started"
        row["max_grad_norm"] = max(grad_norms, default=None)
        row.update(flat)
        rows.append(row)
    columns = ["run", "run_dir", *SUMMARY_COLUMNS, "max_grad_norm"]
    frame = pd.DataFrame(rows, columns=columns + sorted({k for r in rows for k in r} -
                                                       set(columns)))
    for column in ("steps", "diverged_step", "final_val_loss", "best_val_loss", "tokens_per_s",
                   "compile_seconds", "vectorized_runs", "max_grad_norm"):
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
        records = read_metrics(os.path.join(d, "metrics.jsonl"))
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
    parsed = out["metric"].str.extract(BLOCK)
    out["layer"] = pd.to_numeric(parsed["index"])
    out["family"] = (parsed["prefix"] + "/block" + parsed["part"].fillna("")).where(
        parsed["index"].notna(), out["metric"])
    return out.sort_values(["run", "metric", "step"], kind="stable").reset_index(drop=True)


def varying_keys(runs, exclude=("run.name", "run.out_dir", "train.compile_cache")):
    """The config keys whose value differs between the runs: what a study varied."""
    keys = [c for c in runs.columns if "." in c and c not in exclude]
    return [k for k in keys if runs[k].astype(str).nunique() > 1]
