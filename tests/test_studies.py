"""The measurements behind the claims, at the tests' tiny scale: properties that hold at any
size (the verdicts that need a larger scale are checked in test_claims)."""

import math

from normexp.studies import SCALES, measure_expected_gradients, \
    measure_init_gradients, measure_leak, measure_scale_invariance

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
