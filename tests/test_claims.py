import json
import math
import os

import pytest

from normexp import claims
from normexp.claims import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from normexp.studies import SCALES

from conftest import normexp

VERDICTS = {SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE}


# --- the judges, fed numbers on both sides of their rules ---------------------------------

def test_init_gradient_judge():
    judge = claims.judge_init_gradients
    assert judge({"post": [3.0, 2.2], "pre": [0.6, 0.9]}).verdict == SUPPORTED
    assert judge({"post": [1.0, 0.9], "pre": [0.6, 0.9]}).verdict == NOT_SUPPORTED
    assert judge({"post": [3.0, 2.2], "pre": [2.0, 1.8]}).verdict == NOT_SUPPORTED
    assert judge({"post": [3.0, 1.3], "pre": [0.6, 0.9]}).verdict == INCONCLUSIVE
    assert "Post-Norm 2.57 [2.20-3.00]" in judge({"post": [3.0, 2.2], "pre": [1, 1]}).figure


def test_depth_slope_judge_fits_log_log_slopes_per_seed():
    def last(pre_exp, post_exp, depths=(6, 8, 10, 12, 14)):
        """Gradients c * L^slope, two seeds (slopes given per seed)."""
        return {"pre": {L: [2 * L ** e for e in pre_exp] for L in depths},
                "post": {L: [3 * L ** e for e in post_exp] for L in depths}}
    slopes = claims.depth_slopes(last([-0.5, -0.4], [0.0, 0.1]))
    assert slopes["pre"] == pytest.approx([-0.5, -0.4]) and slopes["post"] == pytest.approx(
        [0.0, 0.1])
    judge = claims.judge_depth_slope
    assert judge(last([-0.5, -0.4], [0.0, 0.1])).verdict == SUPPORTED
    assert judge(last([-0.1, 0.05], [0.0, 0.1])).verdict == NOT_SUPPORTED  # Pre does not fall
    assert judge(last([-0.5, -0.4], [-0.5, -0.45])).verdict == NOT_SUPPORTED  # Post falls too
    assert judge(last([-0.5, -0.15], [0.0, 0.1])).verdict == INCONCLUSIVE
    assert "Pre-LN -0.45 [-0.50, -0.40]" in judge(last([-0.5, -0.4], [0.0, 0.1])).figure
    as_json = json.loads(json.dumps(last([-0.5, -0.4], [0.0, 0.1])))  # depths as strings
    assert judge(as_json).verdict == SUPPORTED


def test_warmup_judge():
    def numbers(post_none, pre_none, post_warmup=(2.00, 2.01)):
        return {"unigram": 3.25, "losses": {"post": {"none": post_none, "warmup": post_warmup},
                                            "pre": {"none": pre_none, "warmup": [1.90, 1.91]}}}
    judge = claims.judge_warmup
    assert judge(numbers([2.6, 2.7], [1.90, 1.92])).verdict == SUPPORTED
    stalled = judge(numbers([3.24, math.inf], [1.90, 1.92]))  # one stalls, one diverges
    assert stalled.verdict == SUPPORTED and "failed 2 vs 0 of 2 seeds" in stalled.figure
    assert judge(numbers([2.00, 2.02], [1.90, 1.92])).verdict == NOT_SUPPORTED
    assert judge(numbers([2.6, 2.7], [2.5, 2.6])).verdict == NOT_SUPPORTED
    assert judge(numbers([2.6, 2.7], [3.24, 1.9])).verdict == NOT_SUPPORTED  # Pre-Norm stalls
    assert judge(numbers([2.018, 2.022], [1.90, 1.92])).verdict == INCONCLUSIVE
    # warmup fails as often as no warmup: no evidence that Post-Norm needs it
    assert judge(numbers([3.24, 3.24], [1.90, 1.92], [3.24, 3.24])).verdict == NOT_SUPPORTED


def test_rmsnorm_judge():
    def numbers(rms_losses, op):
        return {"losses": {"layernorm": [2.00, 2.01], "rmsnorm": rms_losses}, "op_ratio": op,
                "step_ratio": 0.97}
    judge = claims.judge_rmsnorm
    assert judge(numbers([2.005, 2.012], 0.8)).verdict == SUPPORTED
    assert judge(numbers([2.3, 2.31], 0.8)).verdict == NOT_SUPPORTED
    assert judge(numbers([2.005, 2.012], 1.1)).verdict == NOT_SUPPORTED
    assert judge(numbers([2.005, 2.012], 0.97)).verdict == INCONCLUSIVE


def test_batchnorm_judge():
    def numbers(rel, spread):
        return {"train_eval_rel": rel, "single_variance": 0.0 if spread == 0 else 0.3,
                "single_spread": spread, "layernorm_spread": 2.0}
    judge = claims.judge_batchnorm
    assert judge(numbers(0.008, 0.0)).verdict == SUPPORTED
    assert judge(numbers(1e-7, 0.0)).verdict == NOT_SUPPORTED
    assert judge(numbers(0.05, 0.7)).verdict == NOT_SUPPORTED
    assert judge(numbers(1e-4, 0.0)).verdict == INCONCLUSIVE


def test_leak_judge():
    judge = claims.judge_leak
    leaky = {"layernorm": 0.0, "rmsnorm": 0.0, "batchnorm": 0.02, "instancenorm": 0.5}
    assert judge(leaky).verdict == SUPPORTED
    assert judge({**leaky, "instancenorm": 0.0}).verdict == NOT_SUPPORTED
    assert judge({**leaky, "layernorm": 1e-7}).verdict == NOT_SUPPORTED


def test_kurtosis_judge():
    judge = claims.judge_kurtosis
    assert judge([4.0, 2.0, 1.0, 0.3]).verdict == SUPPORTED
    assert judge([-4.0, 2.0, -1.0, 0.3]).verdict == SUPPORTED  # |excess kurtosis| counts
    assert judge([0.3, 1.0, 2.0, 4.0]).verdict == NOT_SUPPORTED
    assert judge([1.0, 3.0, 0.2, 2.0]).verdict == INCONCLUSIVE


def test_scale_invariance_judge():
    def numbers(out, grad, control=0.5):
        return {"output_change": {2.0: out, 10.0: out / 2}, "grad_scaling": {2.0: grad},
                "control_change": control}
    judge = claims.judge_scale_invariance
    assert judge(numbers(2e-4, 1.001)).verdict == SUPPORTED
    assert "2e-04 (c=2)" in judge(numbers(2e-4, 1.001)).figure
    assert judge(numbers(0.1, 1.001)).verdict == NOT_SUPPORTED
    assert judge(numbers(5e-3, 1.001)).verdict == INCONCLUSIVE
    assert judge(numbers(1e-7, 1.5)).verdict == NOT_SUPPORTED
    assert judge(numbers(1e-7, 1.001, control=0.0)).verdict == INCONCLUSIVE


# --- every claim measured on a tiny setup -------------------------------------------------

def test_every_claim_runs_on_a_tiny_setup_and_writes_its_table(tmp_path):
    out = str(tmp_path / "claims")
    results = claims.run_claims(SCALES["tiny"], out, echo=lambda line: None)
    assert [r.number for r in results] == [1, 1, 1, 2, 3, 4, 5, 6, 6, 7]
    assert {r.verdict.verdict for r in results} <= VERDICTS
    by_number = {r.number: r for r in results}
    # properties that hold at any size
    assert by_number[5].verdict.verdict == SUPPORTED, by_number[5].numbers
    assert by_number[5].numbers["leaks"]["layernorm"] == 0.0
    assert by_number[4].numbers["single_variance"] == 0.0
    assert by_number[4].numbers["single_spread"] == 0.0
    assert by_number[7].numbers["control_change"] > 1e-2
    assert all(abs(v - 1) < 0.02 for v in by_number[7].numbers["grad_scaling"].values())
    assert len(by_number[6].numbers["kurtosis"]) == SCALES["tiny"].n_layer
    for r in results:  # the verdict is the judge's on the numbers written beside it
        assert r.verdict.figure and r.verdict.rule
    table = open(os.path.join(out, "claims.md")).read()
    assert table.count("\n| ") == len(results) + 1  # the header, then one row per result
    saved = json.load(open(os.path.join(out, "claims.json")))
    assert [s["verdict"]["verdict"] for s in saved] == [r.verdict.verdict for r in results]
    assert sorted(os.listdir(out)) == ["batchnorm", "claims.json", "claims.md", "rmsnorm",
                                       "warmup"]
    # the training studies are ordinary runs: a second invocation reuses them
    again = claims.run_claims(SCALES["tiny"], out, only=[2], echo=lambda line: None)
    assert again[0].numbers == by_number[2].numbers


def test_claims_command_runs_one_claim_and_rejects_bad_numbers(tmp_path):
    done = normexp("claims", "--quick", "--only", "5", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "verdict:  SUPPORTED" in done.stdout
    assert (tmp_path / "claims.md").exists()
    bad = normexp("claims", "--only", "9")
    assert bad.returncode == 2 and "expected claim numbers from 1 to 7" in bad.stderr
