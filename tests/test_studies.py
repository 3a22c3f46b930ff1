"""The measurements behind the claims, at the tests' tiny scale: properties that hold at any
size (the verdicts that need a larger scale are checked in test_claims)."""

import math

from normexp import norms, verdicts
from normexp.studies import SCALES, measure_batchnorm, measure_expected_gradients, \
    measure_init_gradients, measure_leak, measure_scale_invariance
from normexp.verdicts import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED

TINY = SCALES["tiny"]


def test_only_the_norms_that_pool_over_positions_leak():
    leaks = measure_leak(TINY)["leaks"]
    assert leaks["layernorm"] == 0.0 and leaks["rmsnorm"] == 0.0
    assert leaks["batchnorm"] > 1e-4 and leaks["instancenorm"] > 1e-4


def test_scaling_the_normalized_projection_changes_nothing_but_its_gradient():
    numbers = measure_scale_invariance(TINY)
    # up to the norm's eps, which matters for the small queries and keys of a fresh model
    assert all(change < 1e-3 for change in numbers["output_change"].values())
    assert all(abs(ratio - 1) < 0.02 for ratio in numbers["grad_scaling"].values())
    assert numbers["control_change"] > 1e-1  # the MLP input is not normalized: it changes


def test_init_gradient_profiles_have_one_norm_per_block_and_seed():
    numbers = measure_init_gradients(TINY, "xavier")
    for placement in ("pre", "post"):
        assert len(numbers["ratios"][placement]) == TINY.seeds
        assert all(len(p) == TINY.init_layers for p in numbers["profiles"][placement])
        assert all(math.isfinite(r) and r > 0 for r in numbers["ratios"][placement])


def test_expected_gradients_have_a_profile_per_depth_and_the_last_block_per_seed():
    numbers = measure_expected_gradients(TINY)
    for placement in ("pre", "post"):
        for L in TINY.depths:
            rows = numbers["profiles"][placement][L]
            assert [len(w) for w in rows["w2"]] == [L] * TINY.seeds
            assert numbers["last_w2"][placement][L] == [w[-1] for w in rows["w2"]]
            for expected, per_batch in zip(rows["w2"], rows["w2_per_batch"]):
                assert all(0 < e <= p for e, p in zip(expected, per_batch))  # ||E g|| <= E||g||


def test_claim_4s_one_token_half_is_measured_through_the_trained_batchnorm(tmp_path,
                                                                           monkeypatch):
    """It was the variance of one input row, 0 whatever BatchNorm did: now the trained model's
    logits for batches of one token, so a BatchNorm that handled one row differently shows."""
    numbers = measure_batchnorm(TINY, str(tmp_path))
    assert numbers["single_train_spread"] == 0.0 and numbers["single_eval_spread"] > 1e-3
    assert math.isfinite(numbers["single_train_loss"])
    assert verdicts.judge_batchnorm(numbers).verdict in (SUPPORTED, INCONCLUSIVE)
    call = norms.BatchNorm.__call__

    def running_averages_for_one_row(self, x):  # what a framework might do at batch one
        if x.shape[0] == 1:
            self.stats.use_running_average = True
        return call(self, x)
    monkeypatch.setattr(norms.BatchNorm, "__call__", running_averages_for_one_row)
    fallback = measure_batchnorm(TINY, str(tmp_path))  # the same trained run, reused
    assert fallback["single_train_spread"] > 1e-3
    assert verdicts.judge_batchnorm(fallback).verdict == NOT_SUPPORTED
