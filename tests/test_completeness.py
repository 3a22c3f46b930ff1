import json
import math

from normexp.completeness import completeness, final_losses
from normexp.rundir import Summary


def _sweep_dir(tmp_path, statuses):
    """A sweep directory written by hand: sweep.json lists a run per status; status None: a
    run never started (no directory), "": one started without a summary.json yet."""
    runs = [{"name": f"lr={i},seed=0", "overrides": {"optim.lr": i, "run.seed": 0}}
            for i in range(len(statuses))]
    (tmp_path / "sweep.json").write_text(json.dumps({"runs": runs}))
    for run, status in zip(runs, statuses):
        if status is None:
            continue
        run_dir = tmp_path / run["name"]
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text("run: {seed: 0}\n")
        if status:
            (run_dir / "summary.json").write_text(json.dumps({"status": status}))
    return str(tmp_path)


def test_completeness_counts_every_unfinished_run_of_a_sweep_as_missing(tmp_path):
    statuses = ["completed", "diverged", None, "", "running", "stopped", "interrupted",
                "failed"]
    found = completeness(_sweep_dir(tmp_path, statuses))
    # a diverged run is a result; a failed one is missing like one never trained
    assert found == {"missing": [f"lr={i},seed=0" for i in range(2, 8)], "of": 8}
    assert completeness([str(tmp_path / "lr=1,seed=0"), str(tmp_path / "lr=7,seed=0")]) == {
        "missing": ["lr=7,seed=0"], "of": 2}
    assert completeness(str(tmp_path / "lr=0,seed=0")) == {"missing": [], "of": 0}  # no sweep


def test_final_losses_tell_a_diverged_run_from_one_that_did_not_finish():
    summaries = [Summary("completed", final_val_loss=2.5), Summary("diverged"),
                 Summary("completed"),  # not finite at the end
                 Summary("failed"), Summary("interrupted")]
    assert final_losses(summaries) == [2.5, math.inf, math.inf, None, None]
