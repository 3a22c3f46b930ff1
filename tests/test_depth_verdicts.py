import math

from normexp.depth_verdicts import (deep_share, judge_angular, judge_mix_loss, judge_pruning,
                                    judge_variance_growth, thirds)
from normexp.verdicts import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED

L = 6


def numbers(**profiles):
    """The depth study's numbers: {placement: {key: [per seed profile]}} for 3 seeds, every
    seed trained."""
    arms = ("pre", "lns", "mix", "post")
    tree = {a: {} for a in arms}
    for name, by_arm in profiles.items():
        for arm, seeds in by_arm.items():
            tree[arm][name] = seeds
    return {"profiles": tree, "losses": {a: [2.0, 2.0, 2.0] for a in arms}, "unigram": 3.5,
            "missing": [], "of": 12}


def growing(factor, seeds=(1.0, 1.1, 0.9)):
    """Per seed, a profile rising geometrically to `factor` times its first block."""
    return [[s * factor ** (l / (L - 1)) for l in range(L)] for s in seeds]


def test_thirds_and_the_deep_share():
    assert thirds([1, 2, 3, 4, 5, 6]) == (1.5, 5.5)
    assert thirds([1, 2]) == (1.0, 2.0)
    assert deep_share([1, 1, 0, 0, 0, 0]) == 0.0
    assert deep_share([1, 1, 0, 0, 3, 3]) == 0.75
    assert deep_share([-0.1, 1, 0, 0, 0.1, -0.2]) == 0.0  # the deep third's -0.05 clipped
    assert math.isnan(deep_share([0, 0, 1, 1, -1, 0]))


def test_variance_growth_both_ways():
    assert judge_variance_growth(numbers(var={"pre": growing(20), "lns": growing(2)})
                                 ).verdict == SUPPORTED
    assert judge_variance_growth(numbers(var={"pre": growing(3), "lns": growing(4)})
                                 ).verdict == NOT_SUPPORTED
    assert judge_variance_growth(numbers(var={"pre": growing(1.5), "lns": growing(1)})
                                 ).verdict == NOT_SUPPORTED  # Pre-LN's does not grow
    # separated seeds but a ratio under 2x, or overlapping seeds: no verdict either way
    assert judge_variance_growth(numbers(var={"pre": growing(6), "lns": growing(4)})
                                 ).verdict == INCONCLUSIVE
    overlap = growing(20)[:2] + growing(3)[2:]
    assert judge_variance_growth(numbers(var={"pre": overlap, "lns": growing(4)})
                                 ).verdict == INCONCLUSIVE


def test_pruning_both_ways():
    cheap_deep = [[0.5, 0.4, 0.2, 0.1, 0.02, 0.01]] * 3
    deep_matters = [[0.5, 0.4, 0.3, 0.3, 0.3, 0.4]] * 3
    verdict = judge_pruning(numbers(damage={"pre": cheap_deep, "lns": deep_matters}))
    assert verdict.verdict == SUPPORTED and "0.03" in verdict.figure
    assert judge_pruning(numbers(damage={"pre": deep_matters, "lns": cheap_deep})
                         ).verdict == NOT_SUPPORTED
    assert judge_pruning(numbers(damage={"pre": deep_matters, "lns": deep_matters})
                         ).verdict == NOT_SUPPORTED
    # no damage anywhere: no share to judge
    assert judge_pruning(numbers(damage={"pre": [[0.0] * L] * 3, "lns": deep_matters})
                         ).verdict == INCONCLUSIVE


def test_angular_both_ways():
    pre = [[0.3, 0.25, 0.1, 0.05, 0.03, 0.02]] * 3
    mix = [[0.4, 0.3, 0.2, 0.15, 0.12, 0.1]] * 3
    post = [[0.2] * L] * 3
    assert judge_angular(numbers(angular={"pre": pre, "mix": mix, "post": post})
                         ).verdict == SUPPORTED
    assert judge_angular(numbers(angular={"pre": mix, "mix": pre, "post": post})
                         ).verdict == NOT_SUPPORTED
    flat = [[0.1] * L] * 3  # Pre-LN's deep blocks turn the stream as much as its first
    assert judge_angular(numbers(angular={"pre": flat, "mix": mix, "post": post})
                         ).verdict == NOT_SUPPORTED
    assert judge_angular(numbers(angular={"pre": pre, "mix": pre[:2] + mix[2:], "post": post})
                         ).verdict == INCONCLUSIVE


def test_a_diverged_or_missing_seed_leaves_the_profiles_unjudged():
    data = numbers(var={"pre": growing(20)[:2] + [None], "lns": growing(2)})
    data["losses"]["pre"][2] = math.inf
    verdict = judge_variance_growth(data)
    assert verdict.verdict == INCONCLUSIVE and "pre seed 2" in verdict.figure
    missing = numbers(var={"pre": growing(20), "lns": growing(2)})
    missing.update(missing=["placement=lns,seed=1"], profiles={})
    assert judge_variance_growth(missing).verdict == INCONCLUSIVE
    assert judge_pruning(missing).verdict == INCONCLUSIVE
    assert judge_angular(missing).verdict == INCONCLUSIVE


def test_mix_loss_both_ways_with_failures_counted():
    def losses(mix, pre, post):
        return {"losses": {"mix": mix, "pre": pre, "post": post}, "unigram": 3.5}
    assert judge_mix_loss(losses([1.9, 1.91, 1.9], [2.0, 2.0, 2.01], [2.1, math.inf, 2.1])
                          ).verdict == SUPPORTED
    assert judge_mix_loss(losses([1.9, 1.9, 3.45], [2.0, 2.0, 2.01], [2.1, 2.1, 2.1])
                          ).verdict == NOT_SUPPORTED  # a stalled Mix-LN seed is a failure
    assert judge_mix_loss(losses([2.2, 2.2, 2.2], [2.0, 2.0, 2.0], [2.1, 2.1, 2.1])
                          ).verdict == NOT_SUPPORTED
    assert judge_mix_loss(losses([2.03, 2.03, 2.03], [2.0, 2.0, 2.0], [2.1, 2.1, 2.1])
                          ).verdict == INCONCLUSIVE  # between noise and twice it
    assert judge_mix_loss(losses([2.0, None, 2.0], [2.0] * 3, [2.0] * 3)
                          ).verdict == INCONCLUSIVE
