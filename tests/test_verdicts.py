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
    def numbers(post_none, pre_none, post_warmup=(2.00, 2.01)):
        return {"unigram": 3.25, "losses": {"post": {"none": post_none, "warmup": post_warmup},
                                            "pre": {"none": pre_none, "warmup": [1.90, 1.91]}}}
    judge = verdicts.judge_warmup
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
    judge = verdicts.judge_rmsnorm
    assert judge(numbers([2.005, 2.012], 0.8)).verdict == SUPPORTED
    assert judge(numbers([2.3, 2.31], 0.8)).verdict == NOT_SUPPORTED
    assert judge(numbers([2.005, 2.012], 1.1)).verdict == NOT_SUPPORTED
    assert judge(numbers([2.005, 2.012], 0.97)).verdict == INCONCLUSIVE


def test_batchnorm_judge():
    def numbers(rel, spread):
        return {"train_eval_rel": rel, "single_variance": 0.0 if spread == 0 else 0.3,
                "single_spread": spread, "layernorm_spread": 2.0}
    judge = verdicts.judge_batchnorm
    assert judge(numbers(0.008, 0.0)).verdict == SUPPORTED
    assert judge(numbers(1e-7, 0.0)).verdict == NOT_SUPPORTED
    assert judge(numbers(0.05, 0.7)).verdict == NOT_SUPPORTED
    assert judge(numbers(1e-4, 0.0)).verdict == INCONCLUSIVE


def test_leak_judge():
    judge = verdicts.judge_leak
    leaky = {"layernorm": 0.0, "rmsnorm": 0.0, "batchnorm": 0.02, "instancenorm": 0.5}
    assert judge(leaky).verdict == SUPPORTED
    assert judge({**leaky, "instancenorm": 0.0}).verdict == NOT_SUPPORTED
    assert judge({**leaky, "layernorm": 1e-7}).verdict == NOT_SUPPORTED


def test_kurtosis_judge():
    judge = verdicts.judge_kurtosis
    assert judge([4.0, 2.0, 1.0, 0.3]).verdict == SUPPORTED
    assert judge([-4.0, 2.0, -1.0, 0.3]).verdict == SUPPORTED  # |excess kurtosis| counts
    assert judge([0.3, 1.0, 2.0, 4.0]).verdict == NOT_SUPPORTED
    assert judge([1.0, 3.0, 0.2, 2.0]).verdict == INCONCLUSIVE


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


def test_qk_sensitivity_judge_pairs_seeds_at_every_width():
    judge = verdicts.judge_qk_sensitivity

    def widths(*gains):  # one width per list of per-seed gains, off = 0.5 + gain
        return {16 * 2 ** i: {"off": {s: 0.5 + g for s, g in enumerate(gain)},
                              "per_head": {s: 0.5 for s in range(len(gain))}}
                for i, gain in enumerate(gains)}
    assert judge(widths([0.1, 0.05], [0.2, 0.3])).verdict == SUPPORTED
    assert judge(widths([0.1, 0.05], [-0.01, 0.0])).verdict == NOT_SUPPORTED  # not at width 32
    assert judge(widths([0.1, 0.05], [0.2, -0.01])).verdict == INCONCLUSIVE  # one seed worse
    assert judge(widths([0.01, 0.015], [0.2, 0.3])).verdict == INCONCLUSIVE  # below the floor
    figure = judge(widths([0.1, 0.05])).figure
    assert "width 16: 0.575 -> 0.500 [+0.050, +0.100]" in figure
    # seeds pair by name, not by position
    named = {16: {"off": {0: 0.6, 2: 0.7}, "per_head": {2: 0.5, 0: 0.5}}}
    assert judge(named).verdict == SUPPORTED and "[+0.100, +0.200]" in judge(named).figure
    # a seed one side lacks is not left out: a verdict on the others could differ
    uneven = judge({16: {"off": {0: 0.6, 1: 0.4, 2: 0.6}, "per_head": {0: 0.5, 2: 0.5}}})
    assert uneven.verdict == INCONCLUSIVE
    assert uneven.figure == "inconclusive: 1 of 6 runs missing (16 per_head seed 1)"
    assert "2 of 4 runs missing" in judge({16: {"off": {0: 0.6}, "per_head": {1: 0.5}}}).figure


def _run(lr, seed, loss, logit, qk="off", train=None, width=16):
    """A logged run: 5 log steps, its train losses and max attention logits."""
    return {"width": width, "qk_norm": qk, "lr": lr, "seed": seed, "loss": loss,
            "diverged": not math.isfinite(loss), "steps": [0, 10, 20, 30, 40],
            "train_loss": train or [5.5, 3.0, 2.5, 2.2, 2.0], "logit_max": logit}


FLAT = [0.1, 0.5, 1.0, 1.2, 1.5]


def test_logit_growth_judge_times_the_growth_against_the_failure():
    judge = verdicts.judge_logit_growth
    best = [_run(1e-3, s, 2.0, FLAT) for s in (0, 1)]
    spiking = [5.5, 3.0, 4.0, 4.5, 4.4]  # behind the best lr's loss from step 20
    early = [0.1, 50.0, 1e3, 1e4, 1e4]  # 10x (at least 10) by step 10
    late = [0.1, 0.5, 1.0, 50.0, 1e3]  # only from step 30
    twins = [_run(1e-1, s, 2.1, [3.0] * 5, qk="per_head") for s in (0, 1)]
    grew = judge(best + twins + [_run(1e-1, s, 4.4, early, train=spiking) for s in (0, 1)])
    assert grew.verdict == SUPPORTED
    assert "2 of 4 runs without qk-norm failed; in 2 of them" in grew.figure
    assert "median: 1e+04 (the same runs with qk-norm: 3)" in grew.figure
    assert judge(best + [_run(1e-1, s, 4.4, late, train=spiking) for s in (0, 1)]).verdict \
        == NOT_SUPPORTED
    assert judge(best + [_run(1e-1, 0, 4.4, early, train=spiking),
                         _run(1e-1, 1, 4.4, late, train=spiking),
                         *(_run(3e-1, s, math.inf, early, train=spiking) for s in (0, 1))]
                 ).verdict == INCONCLUSIVE  # 3 of the 4 failed runs grew first
    # a run that only ends worse fails at its last step: growth at any step came before it
    assert judge(best + [_run(1e-1, s, 2.5, late) for s in (0, 1)]).verdict == SUPPORTED
    # nothing failed: nothing to explain; and a low lr that has not converged is not a failure
    assert judge(best + [_run(1e-1, s, 2.05, early) for s in (0, 1)]).verdict == INCONCLUSIVE
    assert judge(best + [_run(1e-4, s, 4.0, FLAT) for s in (0, 1)]).verdict == INCONCLUSIVE
    # no logits logged (log.attention off): nothing to time, not a refutation
    blind = judge([_run(1e-3, 0, 2.0, [math.nan] * 5), _run(1e-1, 0, 4.4, [math.nan] * 5)])
    assert blind.verdict == INCONCLUSIVE and "not logged" in blind.figure


# --- incomplete input: an arm, a seed or a run missing --------------------------------------

def _inconclusive(verdict, figure):
    assert verdict.verdict == INCONCLUSIVE and figure in verdict.figure, verdict.figure
    assert verdict.figure.startswith("inconclusive: ")


def test_qk_sensitivity_judge_without_the_off_arm_is_inconclusive():
    """`normexp claims --quick` once ended in KeyError: 'off' here: width 16's runs without
    qk-norm had not been trained."""
    seeds = {0: 0.5, 1: 0.5}
    by_width = {16: {"per_head": seeds}, 32: {"off": {0: 0.7, 1: 0.8}, "per_head": seeds}}
    _inconclusive(verdicts.judge_qk_sensitivity(by_width),
                  "2 of 8 runs missing (16 off seed 0, 16 off seed 1)")
    _inconclusive(verdicts.judge_qk_sensitivity({}), "no runs to judge")


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


def test_logit_growth_judge_without_a_failed_runs_reference_is_inconclusive():
    spiking, early = [5.5, 3.0, 4.0, 4.5, 4.4], [0.1, 50.0, 1e3, 1e4, 1e4]
    runs = [_run(1e-3, 0, 2.0, FLAT)] + [_run(1e-1, s, 4.4, early, train=spiking)
                                         for s in (0, 1)]  # seed 1 at the best lr: StopIteration
    _inconclusive(verdicts.judge_logit_growth(runs), "1 of 4 runs missing (width 16 lr 0.001 "
                                                     "seed 1)")
    _inconclusive(verdicts.judge_logit_growth([]), "no runs to judge")


def test_judges_of_single_measurements_name_the_missing_one():
    leaky = {"layernorm": 0.0, "rmsnorm": 0.0, "batchnorm": 0.02}
    _inconclusive(verdicts.judge_leak(leaky), "1 of 4 measurements missing (instancenorm)")
    batchnorm = {"train_eval_rel": 0.008, "single_variance": 0.0, "layernorm_spread": 2.0}
    _inconclusive(verdicts.judge_batchnorm(batchnorm),
                  "1 of 4 measurements missing (single_spread)")
    # what measure_batchnorm returns when its run did not finish
    _inconclusive(verdicts.judge_batchnorm({"missing": ["kind=batchnorm,seed=0"], "of": 1}),
                  "4 of 4 measurements missing")
    _inconclusive(verdicts.judge_kurtosis([4.0, math.nan, 1.0]), "1 of 3 blocks missing (1)")
    _inconclusive(verdicts.judge_kurtosis([]), "no blocks to judge")
    _inconclusive(verdicts.judge_scale_invariance({"output_change": {}, "grad_scaling": {2.0: 1},
                                                   "control_change": 0.5}),
                  "1 of 3 measurements missing (output_change)")


def test_incomplete_names_a_few_of_the_missing_runs_and_where():
    verdict = verdicts.incomplete([f"r{i}" for i in range(7)], 24, where="out/lr_sensitivity")
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.figure == ("inconclusive: 7 of 24 runs missing in out/lr_sensitivity (r0, r1, "
                              "r2, r3 and 3 more)")
