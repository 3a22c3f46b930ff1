"""The measurements behind the claims, at the tests' tiny scale: properties that hold at any
size (the verdicts that need a larger scale are checked in test_claims)."""

import math

from normexp.studies import SCALES, measure_init_gradients, measure_leak, \
    measure_scale_invariance

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
