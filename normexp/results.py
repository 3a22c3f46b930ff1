"""The results table of a sweep (or any directory of runs): one row per run, written atomically.

Columns: `run`, the swept keys, `status`, `diverged_step`, `final_val_loss`, `best_val_loss`,
`max_grad_norm`, `tokens_per_s`, `steps`. Runs of the sweep that have not started are listed as
`pending`, so every shard's table lists the whole sweep.
"""

import csv
import io
import json
import os

from normexp import config as config_lib
from normexp.errors import UsageError
from normexp.locks import RunLock
from normexp.tracking import read_json, read_metrics, write_atomic

COLUMNS = ("status", "diverged_step", "final_val_loss", "best_val_loss", "max_grad_norm",
           "tokens_per_s", "steps")


def _runs(sweep_dir):
    """(names in order, swept keys, {name: swept values}) from sweep.json or the run configs."""
    manifest = read_json(os.path.join(sweep_dir, "sweep.json"))
    if manifest:
        runs = manifest["runs"]
        return ([r["name"] for r in runs], manifest["axes"],
                {r["name"]: r["overrides"] for r in runs})
    names = sorted(d for d in os.listdir(sweep_dir)
                   if os.path.isfile(os.path.join(sweep_dir, d, "config.yaml")))
    configs = {n: config_lib.flatten(config_lib.read_yaml(
        os.path.join(sweep_dir, n, "config.yaml"))) for n in names}
    keys = sorted({k for c in configs.values() for k, v in c.items()
                   if k not in ("run.name", "run.out_dir")
                   and any(o.get(k) != v for o in configs.values())})
    return names, keys, {n: {k: c.get(k) for k in keys} for n, c in configs.items()}


def collect(sweep_dir):
    """The table's rows, as dicts, in the sweep's order."""
    if not os.path.isdir(sweep_dir):
        raise UsageError(f"{sweep_dir}: no such sweep directory")
    names, keys, values = _runs(sweep_dir)
    is_sweep = os.path.isfile(os.path.join(sweep_dir, "sweep.json"))
    if not names:
        raise UsageError(f"{sweep_dir}: neither a sweep (no sweep.json) nor a directory of runs "
                         f"(no <run>/config.yaml)")
    rows = []
    for name in names:
        run_dir = os.path.join(sweep_dir, name)
        summary = read_json(os.path.join(run_dir, "summary.json")) or {}
        status = summary.get("status") or ("pending" if not os.path.isdir(run_dir) else "started")
        if is_sweep and status in ("running", "started") and not RunLock(sweep_dir, name).held():
            status = "stopped"  # its process is gone: the next sweep resumes it
        grad_norms = [r["grad_norm"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))
                      if r.get("grad_norm") is not None]
        row = {"run": name, **{k: values[name].get(k) for k in keys}, "status": status,
               "diverged_step": summary.get("diverged_step"),
               "final_val_loss": summary.get("final_val_loss"),
               "best_val_loss": summary.get("best_val_loss"),
               "max_grad_norm": max(grad_norms, default=None),
               "tokens_per_s": summary.get("tokens_per_s"), "steps": summary.get("steps")}
        rows.append(row)
    return rows


def _csv(rows):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write(rows, sweep_dir):
    """results.csv plus results.parquet (results.jsonl without pyarrow); returns the paths."""
    paths = [os.path.join(sweep_dir, "results.csv")]
    write_atomic(paths[0], _csv(rows))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        paths.append(os.path.join(sweep_dir, "results.jsonl"))
        write_atomic(paths[1], "".join(json.dumps(r) + "\n" for r in rows))
        return paths
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    paths.append(os.path.join(sweep_dir, "results.parquet"))
    write_atomic(paths[1], buffer.getvalue())
    return paths


def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows):
    """The rows as aligned text, one line per run."""
    cells = [[_cell(v) for v in r.values()] for r in rows]
    header = list(rows[0])
    widths = [max(len(c) for c in column) for column in zip(header, *cells)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)
