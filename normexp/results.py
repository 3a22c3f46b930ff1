"""The results table of a sweep (or any directory of runs): `analysis.load_runs` cut to the
columns that compare runs, written with pandas.

Columns: `run`, the swept keys (a sweep's axes, else the config keys that differ), then
analysis.TABLE: `status`, `diverged_step`, `final_val_loss`, `best_val_loss`, `max_grad_norm`,
`tokens_per_s`, `steps`. A sweep's runs that have not started are listed as `pending`, so every
shard's table lists the whole sweep.

`frame` and `cell` also build the tables of `normexp report` and `normexp compare`, which pick
their own runs and keys, so that a run reads the same wherever it is shown.
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


def frame(runs, keys, columns=analysis.TABLE):
    """`runs` (analysis.load_runs) cut to `run`, `keys` and `columns`, in the runs' order: the
    one runs table, which `normexp results`, `report` and `compare` each show."""
    out = runs[["run", *keys, *columns]].reset_index(drop=True)
    return out.astype({column: "Int64" for column in _COUNTS if column in out})


def table(path):
    """The table as a DataFrame, one row per run in the sweep's order."""
    runs = analysis.load_runs(path, pending=True)
    manifest = read_manifest(path) if isinstance(path, (str, os.PathLike)) else None
    return frame(runs, manifest["axes"] if manifest else analysis.varying_keys(runs))


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


def cell(value, column=None):
    """A value as every table prints it: '-' where missing, floats to 4 significant digits,
    tokens/s whole with thousands separators (1.235e+05 hides the digits that matter)."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if column == "tokens_per_s" else f"{value:.4g}"
    return str(value)


def cells(frame):
    """The frame with each value as its text cell."""
    return frame.astype(object).apply(lambda values: values.map(
        lambda value: cell(value, values.name)))


def rows(frame):
    """The table as (header, rows of text cells), for markdown and HTML."""
    return list(frame.columns), cells(frame).values.tolist()


def to_text(frame):
    """The table as aligned text, one line per run, '-' where a value is missing."""
    text = cells(frame)
    widths = {c: max([len(c), *text[c].str.len()]) for c in text}
    return text.to_string(index=False, header=[c.ljust(widths[c]) for c in text],
                          formatters={c: (lambda w: lambda v: v.ljust(w))(widths[c])
                                      for c in text})
