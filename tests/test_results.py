import json
import os
import sys

import pandas as pd
import pytest

from normexp import analysis
from normexp import config as config_lib
from normexp import results as results_lib
from normexp import sweep as sweep_lib
from normexp.rundir import read_metrics

from conftest import TINY, cli_in_process, normexp, tiny_base, write_sweep


def metrics_of(run_dir):
    return read_metrics(run_dir)


def test_results_lists_every_run_and_writes_csv_and_parquet_or_jsonl(tmp_path, monkeypatch):
    sweep = sweep_lib.load(write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3]},
                                       base=tiny_base("train.steps=2")))
    sweep_lib.run(sweep, progress=False)
    table = results_lib.table(sweep.out_dir)
    assert list(table.columns) == ["run", "optim.lr", "status", "diverged_step",
                                   "final_val_loss", "best_val_loss", "max_grad_norm",
                                   "loss_spike_score", "grad_norm_spike_score",
                                   "tokens_per_s", "steps"]
    assert list(table["optim.lr"]) == [1e-3, 2e-3]
    assert table["max_grad_norm"][0] == max(m["grad_norm"] for m in metrics_of(
        sweep.runs[0].cfg.run.dir) if "grad_norm" in m)
    rows = [{k: (None if pd.isna(v) else v) for k, v in r.items()}  # a missing value: null
            for r in table.astype(object).to_dict("records")]
    assert rows[0]["steps"] == 2 and rows[0]["diverged_step"] is None
    paths = results_lib.write(table, sweep.out_dir)
    lines = open(paths[0]).read().splitlines()
    assert lines[0] == ",".join(table.columns) and lines[1].startswith("lr=0.001,0.001,completed,,")
    assert lines[1].endswith(",2")  # a count is written as an integer
    pq = pytest.importorskip("pyarrow.parquet")
    assert pq.read_table(paths[1]).to_pylist() == rows
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    paths = results_lib.write(table, sweep.out_dir)
    assert paths[1].endswith("results.jsonl")
    assert [json.loads(line) for line in open(paths[1])] == rows
    assert not [f for f in os.listdir(sweep.out_dir) if f.startswith(".tmp")]
    printed = normexp("results", sweep.out_dir)  # a fresh process: pyarrow is hidden here
    assert printed.returncode == 0 and printed.stdout.splitlines()[1].startswith("lr=0.001")
    assert cli_in_process("results", str(tmp_path / "none")).returncode == 2


def test_results_of_a_plain_directory_of_runs_finds_the_keys_that_differ(tmp_path, tiny):
    from normexp.train import run
    for lr in ("1e-3", "2e-3"):
        run(config_lib.load(None, TINY + ["train.steps=2", f"optim.lr={lr}",
                                          f"run.out_dir={tmp_path / lr}"]))
    table = results_lib.table(str(tmp_path))
    assert list(table.columns[:3]) == ["run", "optim.lr", "status"]
    assert table[["run", "optim.lr", "status"]].values.tolist() == [
        ["1e-3", 0.001, "completed"], ["2e-3", 0.002, "completed"]]


def test_a_value_prints_alike_wherever_it_is_missing_or_large():
    runs = pd.DataFrame({"run": ["a", "b"], "optim.lr": [3e-3, 1e-2],
                         "status": ["completed", "running"], "diverged_step": [float("nan")] * 2,
                         "final_val_loss": [2.90412, float("nan")], "best_val_loss": [2.9, None],
                         "max_grad_norm": [1e31, float("inf")],
                         "loss_spike_score": [0.0, float("nan")],
                         "grad_norm_spike_score": [1.25, float("nan")],
                         "tokens_per_s": [123456.7, float("nan")],
                         "steps": [10000.0, float("nan")]})  # as load_runs reads them: floats
    header, rows = results_lib.rows(results_lib.frame(runs, ["optim.lr"]))
    assert header == ["run", "optim.lr", "status", "diverged_step", "final_val_loss",
                      "best_val_loss", "max_grad_norm", "loss_spike_score",
                      "grad_norm_spike_score", "tokens_per_s", "steps"]
    # a count is a whole number, not 1e+04; throughput keeps its digits, not 1.235e+05
    assert rows == [["a", "0.003", "completed", "-", "2.904", "2.9", "1e+31", "0", "1.25",
                     "123,457", "10000"],
                    ["b", "0.01", "running", "-", "-", "-", "inf", "-", "-", "-", "-"]]
    assert [results_lib.cell(v) for v in (None, pd.NA, float("nan"), True, 7)] == [
        "-", "-", "-", "True", "7"]


def test_a_run_reads_the_same_in_results_report_and_compare(study, tmp_path, monkeypatch):
    from normexp import compare, report
    lines = results_lib.to_text(results_lib.table(study.out_dir)).splitlines()
    shown = {line.split()[0]: dict(zip(lines[0].split(), line.split())) for line in lines[1:]}
    assert len(shown) == 8 and {r["final_val_loss"] for r in shown.values()} >= {"-"}
    monkeypatch.setattr(report, "figures", lambda runs, metrics: [])  # only its table matters
    report.write_report(study.out_dir, str(tmp_path / "report"))
    md = (tmp_path / "report" / "report.md").read_text().splitlines()
    table = md[md.index("## Runs") + 2:]
    header, rows = table[0][2:-2].split(" | "), [line[2:-2].split(" | ") for line in table[2:]]
    assert len(rows) == 8 and {"optim.lr", "run.seed", "steps"} <= set(header)
    for row in rows:
        assert {c: shown[row[0]][c] for c in header} == dict(zip(header, row))
    runs = analysis.load_runs(study.out_dir)
    paths = sorted(runs.loc[(runs["optim.lr"] == 3e-3) & (runs["run.seed"] == 0), "run_dir"])
    lines = compare.compare(paths)[0].splitlines()
    side = {line.split()[0]: line.split()[1:] for line in lines[2:] if line.strip()}
    for i, name in enumerate(lines[1].split()):  # one column per run
        for c in ("model.placement", "status", "final_val_loss", "best_val_loss",
                  "tokens_per_s"):
            assert side[c][i] == shown[name][c], (name, c)
        assert side["steps"][i] == shown[name]["steps"] + "/12"  # done of planned
