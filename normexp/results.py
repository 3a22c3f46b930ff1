"""The results table of a sweep (or any directory of runs): `analysis.load_runs` cut to the
columns that compare runs, written with pandas.

Columns: `run`, the swept keys (a sweep's axes, else the config keys that differ), then
analysis.TABLE: `status`, `diverged_step`, `final_val_loss`, `best_val_loss`, `max_grad_norm`,
`tokens_per_s`, `steps`. A sweep's runs that have not started are listed as `pending`, so every
shard's table lists the whole sweep.
"""

import io
import json
import math
import os

import pandas as pd

from normexp import analysis
from normexp.rundir import write_atomic
from normexp.sweep import read_manifest

_COUNTS = ("diverged_step", "steps")  # integers, blank where missing (not 3.0 and NaN)


def table(path):
    """The table as a DataFrame, one row per run in the sweep's order."""
    runs = analysis.load_runs(path, pending=True)
    manifest = read_manifest(path) if isinstance(path, (str, os.PathLike)) else None
    keys = manifest["axes"] if manifest else analysis.varying_keys(runs)
    out = runs[["run", *keys, *analysis.TABLE]].reset_index(drop=True)
    return out.astype({column: "Int64" for column in _COUNTS})


def write(frame, sweep_dir):
    """results.csv plus results.parquet (results.jsonl without pyarrow), each replaced
    atomically; returns the paths."""
    paths = [os.path.join(sweep_dir, "results.csv")]
    write_atomic(paths[0], frame.to_csv(index=False, lineterminator="\n"))
    try:
        import pyarrow  # noqa: F401  (pandas writes parquet through it)
    except ImportError:
        paths.append(os.path.join(sweep_dir, "results.jsonl"))
        records = frame.astype(object).where(frame.notna(), None).to_dict("records")
        # json, not DataFrame.to_json, which rounds floats to 15 digits
        write_atomic(paths[1], "".join(json.dumps(r) + "\n" for r in records))
        return paths
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    paths.append(os.path.join(sweep_dir, "results.parquet"))
    write_atomic(paths[1], buffer.getvalue())
    return paths


def _cell(value):
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def to_text(frame):
    """The table as aligned text, one line per run, '-' where a value is missing."""
    cells = frame.astype(object).map(_cell)
    widths = {c: max([len(c), *cells[c].str.len()]) for c in cells}
    return cells.to_string(index=False, header=[c.ljust(widths[c]) for c in cells],
                           formatters={c: (lambda w: lambda v: v.ljust(w))(widths[c])
                                       for c in cells})
