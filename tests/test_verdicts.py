import json
import math

import pytest

from normexp import verdicts
from normexp.verdicts import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED


# --- the judges, fed numbers on both sides of their rules ---------------------------------

def test_init_gradient_judge():
    judge = verdicts.judge_init_gradients
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
    slopes = verdicts.depth_slopes(last([-0.5, -0.4], [0.0, 0.1]))
    assert slopes["pre"] == pytest.approx([-0.5, -0.4]) and slopes["post"] == pytest.approx(
        [0.0, 0.1])
    judge = verdicts.judge_depth_slope
    assert judge(last([-0.5, -0.4], [0.0, 0.1])).verdict == SUPPORTED
    assert judge(last([-0.1, 0.05], [0.0, 0.1])).verdict == NOT_SUPPORTED  # Pre does not fall
    assert judge(last([-0.5, -0.4], [-0.5, -0.45])).verdict == NOT_SUPPORTED  # Post falls too
    assert judge(last([-0.5, -0.15], [0.0, 0.1])).verdict == INCONCLUSIVE
    assert "Pre-LN -0.45 [-0.50, -0.40]" in judge(last([-0.5, -0.4], [0.0, 0.1])).figure
    as_json = json.loads(json.dumps(last([-0.5, -0.4], [0.0, 0.1])))  # depths as strings
    assert judge(as_json).verdict == SUPPORTED


def test_warmup_judge():
    def numbers(post_none, pre_none, post_warmup=(2.00, 2.01, 2.02), pre_warmup=None):
        return {"unigram": 3.25, "losses": {
            "post": {"none": post_none, "warmup": list(post_warmup)},
            "pre": {"none": pre_none, "warmup": pre_warmup or [1.90, 1.91, 1.92]}}}
    judge = verdicts.judge_warmup
    fine = [1.90, 1.92, 1.91]
    assert judge(numbers([2.6, 2.7, 2.65], fine)).verdict == SUPPORTED  # worse by > noise
    stalled = judge(numbers([3.24, math.inf, 3.3], fine))  # all fail: stall, diverge, stall
    assert stalled.verdict == SUPPORTED
    assert "without warmup failed in 3 of 3 seeds, with warmup in 0 of 3 (p = 0.05)" in \
        stalled.figure
    assert judge(numbers([2.00, 2.02, 2.01], fine)).verdict == NOT_SUPPORTED
    assert judge(numbers([2.6, 2.7, 2.65], [2.5, 2.6, 2.55])).verdict == NOT_SUPPORTED
    assert judge(numbers([2.025, 2.03, 2.02], fine)).verdict == INCONCLUSIVE
    # with warmup every seed fails too: the lr is too high for Post-Norm either way, and the
    # study shows nothing about what warmup does
    assert judge(numbers([3.24] * 3, fine, [3.24] * 3)).verdict == INCONCLUSIVE


def test_warmup_judge_needs_a_failure_count_that_seed_noise_cannot_give():
    """3 of 3 failures against 2 of 3 was judged supported: any difference counted."""
    judge, fine = verdicts.judge_warmup, [1.90, 1.92, 1.91]
    numbers = lambda post_none, post_warmup, pre_none=fine: {"unigram": 3.25, "losses": {
        "post": {"none": post_none, "warmup": post_warmup},
        "pre": {"none": pre_none, "warmup": fine}}}
    three_vs_two = judge(numbers([3.24, 3.24, 3.24], [3.24, 3.24, 2.3]))
    assert three_vs_two.verdict == INCONCLUSIVE, three_vs_two.figure
    assert "failed in 3 of 3 seeds, with warmup in 2 of 3 (p = 0.50)" in three_vs_two.figure
    # 2 of 3 against 0 of 3 could be chance (p = 0.2) ...
    assert verdicts.fails_more(2, 3, 0, 3) == pytest.approx(0.2)
    # ... 4 of 5 against 0 of 5 hardly (p = 0.024), and 5 against 1 neither
    assert verdicts.fails_more(4, 5, 0, 5) == pytest.approx(5 / 210)
    five = [1.90, 1.92, 1.91, 1.93, 1.90]
    assert judge({"unigram": 3.25, "losses": {
        "post": {"none": [3.24, 3.24, 3.24, 3.24, 2.0], "warmup": [2.0, 2.01, 2.02, 2.0, 2.01]},
        "pre": {"none": five, "warmup": five}}}).verdict == SUPPORTED
    # Pre-Norm failing in one more seed is not enough to say it needs warmup either
    assert judge(numbers([2.6, 2.7, 2.65], [2.0, 2.01, 2.02], [math.inf, 1.90, 1.91])
                 ).verdict == INCONCLUSIVE


def test_rmsnorm_judge():
    def numbers(rms_losses, op):
        return {"losses": {"layernorm": [2.00, 2.01], "rmsnorm": rms_losses}, "op_ratio": op,
                "step_ratio": 0.97}
    judge = verdicts.judge_rmsnorm
    assert judge(numbers([2.005, 2.012], 0.8)).verdict == SUPPORTED
    assert judge(numbers([2.3, 2.31], 0.8)).verdict == NOT_SUPPORTED
    assert judge(numbers([2.005, 2.012], 1.1)).verdict == NOT_SUPPORTED
    assert judge(numbers([2.005, 2.012], 0.97)).verdict == INCONCLUSIVE


def test_rmsnorm_judge_counts_a_diverged_seed():
    """LayerNorm [2.00, 2.01, 2.02] against RMSNorm [2.01, inf, inf] was judged supported with
    a gap of +0.000: the diverged seeds were dropped from the mean and from the noise."""
    judge = verdicts.judge_rmsnorm
    numbers = lambda ln, rms: {"losses": {"layernorm": ln, "rmsnorm": rms}, "op_ratio": 0.8,
                               "step_ratio": 0.97}
    verdict = judge(numbers([2.00, 2.01, 2.02], [2.01, math.inf, math.inf]))
    assert verdict.verdict == NOT_SUPPORTED
    assert "diverged: LayerNorm 0 of 3 seeds, RMSNorm 2 of 3" in verdict.figure
    # as many diverged on both sides: the rest may match, but that is no evidence of a match
    assert judge(numbers([2.00, math.inf, 2.02], [2.01, math.inf, 2.0])).verdict == \
        INCONCLUSIVE
    assert judge(numbers([math.inf] * 3, [math.inf] * 3)).verdict == INCONCLUSIVE


def test_batchnorm_judge():
    def numbers(rel, spread, control=0.8):
        return {"train_eval_rel": rel, "single_train_spread": spread,
                "single_eval_spread": control, "single_train_loss": 5.5,
                "single_eval_loss": 3.1}
    judge = verdicts.judge_batchnorm
    assert judge(numbers(0.008, 0.0)).verdict == SUPPORTED
    assert "differ between tokens by 0.0e+00 with batch statistics and 0.80 with running " \
        "averages (relative), loss 5.50 vs 3.10 nats" in judge(numbers(0.008, 0.0)).figure
    assert judge(numbers(1e-7, 0.0)).verdict == NOT_SUPPORTED
    assert judge(numbers(0.05, 0.7)).verdict == NOT_SUPPORTED
    assert judge(numbers(1e-4, 0.0)).verdict == INCONCLUSIVE
    # the control: a model whose logits ignore the token in both modes shows nothing about
    # batch statistics
    assert judge(numbers(0.008, 0.0, control=0.0)).verdict == INCONCLUSIVE


def test_leak_judge():
    judge = verdicts.judge_leak
    leaky = {"layernorm": 0.0, "rmsnorm": 0.0, "batchnorm": 0.02, "instancenorm": 0.5}
    assert judge(leaky).verdict == SUPPORTED
    assert judge({**leaky, "instancenorm": 0.0}).verdict == NOT_SUPPORTED
    assert judge({**leaky, "layernorm": 1e-7}).verdict == NOT_SUPPORTED


def test_kurtosis_judge():
    judge = lambda k, losses=(2.0, 2.1, 2.2): verdicts.judge_kurtosis(
        {"kurtosis": k, "losses": list(losses), "unigram": 3.25})
    assert judge([4.0, 2.0, 1.0, 0.3]).verdict == SUPPORTED
    assert judge([-4.0, 2.0, -1.0, 0.3]).verdict == SUPPORTED  # |excess kurtosis| counts
    assert judge([0.3, 1.0, 2.0, 4.0]).verdict == NOT_SUPPORTED
    assert judge([1.0, 3.0, 0.2, 2.0]).verdict == INCONCLUSIVE


def test_kurtosis_judge_measures_trained_models_only():
    """Claim 6 for Post-LN was judged on the warmup study's runs, 2 of 3 of which had stalled
    at the unigram loss: a claim about trained models needs models that trained."""
    judge = lambda losses: verdicts.judge_kurtosis(
        {"kurtosis": [0.3, 1.0, 2.0, 4.0], "losses": losses, "unigram": 3.25})
    stalled = judge([3.24, 2.3, 3.2])
    assert stalled.verdict == INCONCLUSIVE
    assert stalled.figure.startswith("inconclusive: 2 of 3 runs did not train (final val loss "
                                     "3.24, 3.20; the unigram loss is 3.25)")
    assert judge([2.0, math.inf, 2.1]).verdict == INCONCLUSIVE  # diverged
    assert judge([2.0, 2.2, 2.1]).verdict == NOT_SUPPORTED


def test_scale_invariance_judge():
    def numbers(out, grad, control=0.5):
        return {"output_change": {2.0: out, 10.0: out / 2}, "grad_scaling": {2.0: grad},
                "control_change": control}
    judge = verdicts.judge_scale_invariance
    assert judge(numbers(2e-4, 1.001)).verdict == SUPPORTED
    assert "2e-04 (c=2)" in judge(numbers(2e-4, 1.001)).figure
    assert judge(numbers(0.1, 1.001)).verdict == NOT_SUPPORTED
    assert judge(numbers(5e-3, 1.001)).verdict == INCONCLUSIVE
    assert judge(numbers(1e-7, 1.5)).verdict == NOT_SUPPORTED
    assert judge(numbers(1e-7, 1.001, control=0.0)).verdict == INCONCLUSIVE


# --- incomplete input: an arm, a seed or a run missing --------------------------------------

def _inconclusive(verdict, figure):
    assert verdict.verdict == INCONCLUSIVE and figure in verdict.figure, verdict.figure
    assert verdict.figure.startswith("inconclusive: ")


def test_every_judge_with_arms_or_seeds_counts_what_is_missing():
    _inconclusive(verdicts.judge_init_gradients({"post": [3.0, 2.2], "pre": [0.6]}),
                  "1 of 4 runs missing (pre seed 1)")
    _inconclusive(verdicts.judge_init_gradients({"post": [3.0, 2.2]}), "2 of 4 runs missing")
    last = {"pre": {L: [2 * L ** -0.5] * 2 for L in (6, 8, 10)}, "post": {L: [3.0] * 2
                                                                          for L in (6, 8, 10)}}
    assert verdicts.judge_depth_slope(last).verdict == SUPPORTED
    _inconclusive(verdicts.judge_depth_slope({**last, "pre": {**last["pre"], 8: [0.7]}}),
                  "1 of 12 runs missing (pre 8 seed 1)")  # ragged: np.polyfit raised
    _inconclusive(verdicts.judge_depth_slope({"pre": last["pre"]}), "6 of 12 runs missing")
    losses = {"post": {"none": [2.6, 2.7], "warmup": [2.0, 2.01]},
              "pre": {"none": [1.9, 1.92], "warmup": [1.9, 1.91]}}
    assert verdicts.judge_warmup({"losses": losses, "unigram": 3.25}).verdict == SUPPORTED
    unfinished = {**losses, "post": {**losses["post"], "none": [2.6, None]}}  # not inf: failed
    _inconclusive(verdicts.judge_warmup({"losses": unfinished, "unigram": 3.25}),
                  "1 of 8 runs missing (post none seed 1)")
    _inconclusive(verdicts.judge_warmup({"losses": {"post": losses["post"]}, "unigram": 3.25}),
                  "4 of 8 runs missing (pre none seed 0, pre none seed 1, pre warmup seed 0, "
                  "pre warmup seed 1)")
    rms = {"losses": {"layernorm": [2.0, 2.01], "rmsnorm": [2.005, 2.012]}, "op_ratio": 0.8,
           "step_ratio": 0.97}
    assert verdicts.judge_rmsnorm(rms).verdict == SUPPORTED
    _inconclusive(verdicts.judge_rmsnorm({**rms, "losses": {"layernorm": [2.0, 2.01],
                                                            "rmsnorm": [math.nan, 2.0]}}),
                  "1 of 4 runs missing (rmsnorm seed 0)")
    _inconclusive(verdicts.judge_rmsnorm({**rms, "losses": {"layernorm": [2.0, 2.01]}}),
                  "2 of 4 runs missing")
    _inconclusive(verdicts.judge_rmsnorm({**rms, "op_ratio": None}),
                  "1 of 2 measurements missing (op_ratio)")


def test_judges_of_single_measurements_name_the_missing_one():
    leaky = {"layernorm": 0.0, "rmsnorm": 0.0, "batchnorm": 0.02}
    _inconclusive(verdicts.judge_leak(leaky), "1 of 4 measurements missing (instancenorm)")
    batchnorm = {"train_eval_rel": 0.008, "single_eval_spread": 0.8, "single_train_loss": 5.5,
                 "single_eval_loss": 3.1}
    _inconclusive(verdicts.judge_batchnorm(batchnorm),
                  "1 of 5 measurements missing (single_train_spread)")
    # what measure_batchnorm returns when its run did not finish
    _inconclusive(verdicts.judge_batchnorm({"missing": ["kind=batchnorm,seed=0"], "of": 1}),
                  "5 of 5 measurements missing")
    trained = {"losses": [2.0, 2.1], "unigram": 3.25}
    _inconclusive(verdicts.judge_kurtosis({**trained, "kurtosis": [4.0, math.nan, 1.0]}),
                  "1 of 3 blocks missing (1)")
    _inconclusive(verdicts.judge_kurtosis({**trained, "kurtosis": []}), "no blocks to judge")
    _inconclusive(verdicts.judge_kurtosis({"kurtosis": [4.0, 1.0], "losses": [2.0]}),
                  "1 of 2 measurements missing (unigram)")
    _inconclusive(verdicts.judge_scale_invariance({"output_change": {}, "grad_scaling": {2.0: 1},
                                                   "control_change": 0.5}),
                  "1 of 3 measurements missing (output_change)")


def test_incomplete_names_a_few_of_the_missing_runs_and_where():
    verdict = verdicts.incomplete([f"r{i}" for i in range(7)], 24, where="out/lr_sensitivity")
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.figure == ("inconclusive: 7 of 24 runs missing in out/lr_sensitivity (r0, r1, "
                              "r2, r3 and 3 more)")
