import dataclasses
import json
import os
import re
import subprocess

import pytest

from normexp import analysis, claims, workers
from normexp.compare import find_runs
from normexp.config import load
from normexp.errors import UsageError
from normexp.lr_study import lr_sensitivity_sweep
from normexp.studies import SCALES, resized
from normexp.verdicts import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED

from conftest import cli_in_process

VERDICTS = {SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE}
# the tiny scale's sweeps train in the test's process; with workers, as at every other scale,
# a test can stand in for them (workers.run_workers) and leave a sweep untrained
WORKERS = dataclasses.replace(SCALES["tiny"], sweep_workers=2)


# --- every claim measured on a tiny setup -------------------------------------------------

def test_claims_1_to_8_run_on_a_tiny_setup_and_write_their_table(tmp_path, monkeypatch):
    out = str(tmp_path / "claims")
    results = claims.run_claims(SCALES["tiny"], out, only=range(1, 9), echo=lambda line: None)
    assert [r.number for r in results] == [1, 1, 1, 2, 3, 4, 5, 6, 6, 7, 8, 8, 8, 8]
    assert {r.verdict.verdict for r in results} <= VERDICTS
    by_number = {r.number: r for r in results}
    # properties that hold at any size
    assert by_number[5].verdict.verdict == SUPPORTED, by_number[5].numbers
    assert by_number[5].numbers["leaks"]["layernorm"] == 0.0
    assert by_number[4].numbers["single_train_spread"] == 0.0  # the trained model, one token
    assert by_number[4].numbers["single_eval_spread"] > 1e-3
    assert by_number[7].numbers["control_change"] > 1e-2
    assert all(abs(v - 1) < 0.02 for v in by_number[7].numbers["grad_scaling"].values())
    assert len(by_number[6].numbers["kurtosis"]) == SCALES["tiny"].n_layer
    for r in results:  # the verdict is the judge's on the numbers written beside it
        assert r.verdict.figure and r.verdict.rule
    table = open(os.path.join(out, "claims.md")).read()
    assert table.count("\n| ") == len(results) + 1  # the header, then one row per result
    saved = json.load(open(os.path.join(out, "claims.json")))
    assert [s["verdict"]["verdict"] for s in saved] == [r.verdict.verdict for r in results]
    assert sorted(os.listdir(out)) == ["batchnorm", "claims.json", "claims.md",
                                       "expected_gradients.png", "lr_sensitivity", "rmsnorm",
                                       "warmup"]
    assert "![claim 1](expected_gradients.png)" in table
    assert "![claim 8](lr_sensitivity/report/logit_max_00.png)" in table
    # claim 8 ran the shipped sweep at the tiny size, one verdict pair per placement
    assert [r.setup.split(",")[0] for r in results if r.number == 8] == ["pre"] * 2 + [
        "post"] * 2
    assert by_number[8].numbers["runs"]  # the last row: Post-LN's logit growth
    first = next(r for r in results if r.number == 8)
    assert set(first.numbers["sensitivity"]) == {16}
    assert all(len(v) == SCALES["tiny"].seeds for v in first.numbers["sensitivity"][16].values())
    report = os.listdir(os.path.join(out, "lr_sensitivity", "report"))
    assert {"loss_vs_lr_00.png", "loss_vs_lr_01.png", "logit_max_01.png"} <= set(report)
    # the training studies are ordinary runs: a second invocation reuses them
    again = claims.run_claims(SCALES["tiny"], out, only=[2], echo=lambda line: None)
    assert again[0].numbers == by_number[2].numbers
    # a run of the sweep that failed and was not retried: no verdict on the others, and the
    # report, of the runs that finished, says which one
    sweep_dir = os.path.join(out, "lr_sensitivity")
    names = [r["name"] for r in json.load(open(os.path.join(sweep_dir, "sweep.json")))["runs"]]
    summary = os.path.join(sweep_dir, names[0], "summary.json")
    json.dump({**json.load(open(summary)), "status": "failed"}, open(summary, "w"))
    monkeypatch.setattr(workers, "run_workers", lambda *args: 0)  # as if it were not retried
    partial = claims.run_claims(WORKERS, out, only=[8], echo=lambda line: None)
    assert [r.verdict.figure for r in partial] == [
        f"inconclusive: 1 of {len(names)} runs missing in {sweep_dir} ({names[0]})"] * 4
    assert "1 failed" in open(os.path.join(sweep_dir, "report", "report.md")).read()


def test_the_depth_claims_train_four_placements_and_prune_every_seed(tmp_path):
    """Claims 9-10 at the tiny size: one study of four placements, each seed's run pruned."""
    out = str(tmp_path / "claims")
    results = claims.run_claims(SCALES["tiny"], out, only=[9, 10], echo=lambda line: None)
    assert [r.number for r in results] == [9, 9, 10, 10]
    assert {r.verdict.verdict for r in results} <= VERDICTS
    seeds, L = SCALES["tiny"].seeds, SCALES["tiny"].depth_layers
    runs = [r for r in os.listdir(os.path.join(out, "depth")) if r.startswith("placement=")]
    assert len(runs) == 4 * seeds
    assert all(load(os.path.join(out, "depth", r, "config.yaml")).model.n_layer == L
               for r in runs)
    profiles = {**results[0].numbers["profiles"], **results[2].numbers["profiles"]}
    assert sorted(profiles) == ["lns", "mix", "post", "pre"]
    for placement, by_key in profiles.items():
        for key in ("var", "damage", "angular"):
            assert [len(p) for p in by_key[key]] == [L] * seeds, (placement, key)
    assert results[3].numbers["losses"].keys() == {"pre", "lns", "mix", "post"}
    table = open(os.path.join(out, "claims.md")).read()
    assert "![claim 9](curse_of_depth.png)" in table and "![claim 10](mix_ln.png)" in table


def test_the_qkv_claim_finds_each_setups_largest_stable_lr_in_its_sweep(tmp_path):
    """Claim 11 at the tiny size: the shipped qkv_norm sweep with claim 8's sizes."""
    out = str(tmp_path / "claims")
    (result,) = claims.run_claims(SCALES["tiny"], out, only=[11], echo=lambda line: None)
    assert result.number == 11 and result.verdict.verdict in VERDICTS
    runs = analysis.load_runs(os.path.join(out, "qkv_norm"))
    assert len(runs) == 3 * 7 * SCALES["tiny"].seeds and set(runs["model.d_model"]) == {16}
    assert set(runs["model.placement"]) == {"pre", "qkv"}
    stable, lrs = result.numbers["stable"], result.numbers["lrs"]
    assert set(stable[16]) == {"qk_norm", "qk_norm+softcap", "qkv"}
    table = {row["setup"]: row for row in result.numbers["table"]}
    for setup, lr in stable[16].items():  # at or above the setup's best lr, on the grid
        assert lr in lrs and lr >= table[setup]["best_lr"]
    assert "![claim 11](qkv_norm_loss_vs_lr.png)" in open(os.path.join(out, "claims.md")).read()


def test_the_dyt_claim_trains_each_alpha0_grid_cell_as_one_group(tmp_path):
    """Claim 12 at the tiny size (one width and depth): a LayerNorm group and a DyT group of
    every alpha0 and seed; the saturation of each DyT run."""
    out = str(tmp_path / "claims")
    results = claims.run_claims(SCALES["tiny"], out, only=[12], echo=lambda line: None)
    assert [r.number for r in results] == [12, 12]
    assert {r.verdict.verdict for r in results} <= VERDICTS
    numbers, seeds = results[0].numbers, SCALES["tiny"].seeds
    assert sorted(numbers["losses"]) == [16]
    for width, by_depth in numbers["losses"].items():
        arms = by_depth[1]
        assert list(arms) == ["layernorm", 0.2, 1.0, 5.0]
        assert all(len(v) == seeds for v in arms.values())
        for alpha in (0.2, 1.0, 5.0):
            assert all(0 <= s <= 1 for s in numbers["saturation"][width][1][alpha])
    summary = json.load(open(os.path.join(out, "claims.json")))
    assert [s["number"] for s in summary] == [12, 12]
    runs = analysis.load_runs(find_runs(os.path.join(out, "dyt")))  # at any depth
    dyt = runs[runs["model.norm.kind"] == "dyt"]
    assert len(runs) == 4 * seeds and set(dyt["vectorized_runs"]) == {3 * seeds}
    table = open(os.path.join(out, "claims.md")).read()
    assert "![claim 12](dyt_alpha.png)" in table and "![claim 12](dyt_saturation.png)" in table


def test_claims_check_a_sweep_that_trained_nothing_before_judging_it(tmp_path, monkeypatch):
    """`normexp claims --quick` once ended in a traceback (KeyError: 'off') when claim 8's
    sweep exited 0 with runs untrained: now each of its verdicts is inconclusive and says why."""
    monkeypatch.setattr(workers, "run_workers", lambda *args: 0)
    out = str(tmp_path / "claims")
    results = claims.run_claims(WORKERS, out, only=[8], echo=lambda line: None)
    names = [r.name for r in lr_sensitivity_sweep(SCALES["tiny"], out).runs]
    sweep_dir = os.path.join(out, "lr_sensitivity")
    missing = f"inconclusive: {len(names)} of {len(names)} runs missing in {sweep_dir}"
    assert [r.verdict.verdict for r in results] == [INCONCLUSIVE] * 4
    assert all(r.verdict.figure.startswith(missing + f" ({names[0]}, ") for r in results)
    assert results[0].numbers["missing"] == names
    assert missing in open(os.path.join(out, "claims.md")).read()


def test_claims_command_runs_one_claim_at_a_changed_size_and_rejects_bad_numbers(tmp_path):
    # one size changed (how README's width-512 figure is made): its own directory and title
    done = cli_in_process("claims", "--quick", "--only", "5", "--scale", "d_model=32",
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "verdict:  SUPPORTED" in done.stdout
    table = (tmp_path / "claims" / "quick-d_model=32" / "claims.md").read_text()
    assert table.startswith("# Claims checked by normexp (quick-d_model=32 scale)")
    assert "32 wide" in table
    bad = cli_in_process("claims", "--only", "13")
    assert bad.returncode == 2 and "expected claim numbers from 1 to 12" in bad.stderr
    bad = cli_in_process("claims", "--quick", "--scale", "init_widht=512", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "--scale init_widht=512: expected FIELD=VALUE with FIELD one of n_layer, d_model" \
        in bad.stderr


def test_a_bad_scale_setting_names_the_field_and_what_it_takes():
    for setting, message in (("init_widht=512", "--scale init_widht=512: expected FIELD=VALUE "
                                                "with FIELD one of n_layer, d_model"),
                             ("seq_len", "--scale seq_len: expected FIELD=VALUE"),
                             ("depths=6,x", "--scale depths=6,x: depths takes positive "
                                            "integers separated by commas"),
                             ("seeds=0", "--scale seeds=0: seeds takes a positive integer"),
                             ("seeds=2,3", "--scale seeds=2,3: seeds takes a positive integer")):
        with pytest.raises(UsageError, match=re.escape(message)):
            resized(SCALES["quick"], [setting])
    assert resized(SCALES["quick"], []) is SCALES["quick"]
    wider = resized(SCALES["quick"], ["init_width=512", "depths=6,8"])
    assert (wider.name, wider.init_width, wider.depths) == ("quick-init_width=512-depths=6,8",
                                                            512, (6, 8))
    assert resized(SCALES["quick"], ["dyt_widths=32,128"]).dyt_widths == (32, 128)


def test_every_readme_figure_is_made_by_the_figures_script():
    """The README's figures were redrawn by hand once; now scripts/figures.sh makes each from
    runs it trains, and nothing else is in docs/figures or shown from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = open(os.path.join(root, "scripts", "figures.sh")).read()
    made = set(re.findall(r'"\$dest/([\w.-]+\.png)"', script))
    shown = set(re.findall(r"\(docs/figures/([\w.-]+\.png)\)",
                           open(os.path.join(root, "README.md")).read()))
    assert made and made == shown == set(os.listdir(os.path.join(root, "docs", "figures")))
    assert subprocess.run(["bash", "-n", os.path.join(root, "scripts", "figures.sh")]
                          ).returncode == 0
