"""`normexp compare` and `normexp ls`: they read runs and write nothing (but --out's figure)."""

import os

import pandas as pd

from normexp import analysis
from normexp.compare import compare, find_runs, listing
from normexp.rundir import read_summary

from conftest import cli_in_process, normexp


def tree(path):
    """Every file under `path` with its size and modification time."""
    return {os.path.join(root, f): (os.path.getsize(os.path.join(root, f)),
                                    os.path.getmtime(os.path.join(root, f)))
            for root, _, files in os.walk(path) for f in files}


def two_runs(study):
    runs = analysis.load_runs(study.out_dir)
    pick = runs[(runs["optim.lr"] == 3e-3) & (runs["run.seed"] == 0)]
    return sorted(pick["run_dir"])


def test_compare_shows_what_differs_and_both_gradient_profiles(study, tmp_path):
    paths = two_runs(study)
    before = tree(study.out_dir)
    text, written = compare(paths, str(tmp_path / "fig"))
    assert tree(study.out_dir) == before  # read only
    assert written == [str(tmp_path / "fig" / "compare.png")] and os.path.getsize(written[0])
    lines = text.splitlines()
    assert lines[0] == "2 runs; they differ in model.placement"
    placement = next(line for line in lines if line.startswith("model.placement"))
    assert placement.split()[1:] == ["post", "pre"]
    for row in ("status", "steps", "final_val_loss", "best_val_loss", "loss_spike_score",
                "grad_norm_spike_score", "tokens_per_s"):
        assert any(line.startswith(row) for line in lines), row
    spikes = next(line for line in lines if line.startswith("loss_spike_score")).split()[1:]
    assert len(spikes) == 2 and "-" not in spikes  # the study's window of 4 steps scores them
    assert next(line for line in lines if line.startswith("steps")).split()[1:] == [
        "12/12", "12/12"]
    blocks = [line.split()[0] for line in lines if line[:2].isdigit()]
    assert blocks == ["00", "01"]  # the tiny model's two blocks, at step 0 and the last
    header = next(line for line in lines if line.startswith("block"))
    assert header.count("@0") == 2 and header.count("@11") == 2


def test_ls_lists_every_run_and_writes_nothing(study):
    before = tree(study.out_dir)
    frame = listing(study.out_dir, now=os.path.getmtime(study.out_dir) + 7200)
    assert tree(study.out_dir) == before
    assert len(frame) == 8 and set(frame["status"]) == {"completed", "diverged"}
    assert set(frame["steps"]) >= {"12/12"} and all(frame["age"].str.endswith(("h", "min")))
    for run_dir, row in zip(find_runs(study.out_dir), frame.itertuples()):  # as summary.json
        summary = read_summary(run_dir)
        shown = [None if pd.isna(v) else v for v in (row.loss_spike_score,
                                                     row.grad_norm_spike_score)]
        assert shown == [summary.loss_spike_score, summary.grad_norm_spike_score]
    assert frame["loss_spike_score"].notna().sum() >= 4  # the runs that trained have one
    done = normexp("ls", study.out_dir)
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 9  # header and 8 runs
    assert tree(study.out_dir) == before


def test_bad_arguments_are_one_line(tmp_path, study):
    result = cli_in_process("compare", two_runs(study)[0])
    assert result.returncode == 2 and "compare: expected at least two runs" in result.stderr
    result = cli_in_process("compare", str(tmp_path), two_runs(study)[0])
    assert result.returncode == 2 and "not a run directory" in result.stderr
    result = cli_in_process("ls", str(tmp_path / "nope"))
    assert result.returncode == 2 and "nope: no such directory" in result.stderr
