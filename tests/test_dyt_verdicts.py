import math

from normexp.dyt_verdicts import judge_alpha_width, judge_dyt_matches
from normexp.verdicts import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED


def study(cells, unigram=3.5):
    """cells: {(width, depth): {arm: mean loss, or a list of per-seed losses}}; a mean is
    spread over 3 seeds by +-0.005."""
    losses = {}
    for (w, d), arms in cells.items():
        losses.setdefault(w, {})[d] = {a: v if isinstance(v, list) else [v - 0.005, v, v + 0.005]
                                       for a, v in arms.items()}
    return {"losses": losses, "unigram": unigram}


def grid(best, ln=2.0, others=2.3, widths=(32, 64), depths=(2, 4)):
    """Every cell: LayerNorm at `ln`, the alpha0 best[width] at 2.0, the others at `others`."""
    return study({(w, d): {"layernorm": ln, **{a: 2.0 if a == best[w] else others
                                               for a in (0.2, 1.0, 5.0)}}
                  for w in widths for d in depths})


def test_dyt_matches_layernorm_both_ways():
    assert judge_dyt_matches(grid({32: 1.0, 64: 0.2})).verdict == SUPPORTED
    assert judge_dyt_matches(grid({32: 1.0, 64: 0.2}, ln=1.8)).verdict == NOT_SUPPORTED
    assert judge_dyt_matches(grid({32: 1.0, 64: 0.2}, ln=1.97)).verdict == INCONCLUSIVE
    failing = grid({32: 1.0, 64: 0.2})
    for alpha in (0.2, 1.0, 5.0):  # every DyT seed but one diverged in one cell
        failing["losses"][32][2][alpha] = [math.inf, math.inf, 2.0]
    verdict = judge_dyt_matches(failing)
    assert verdict.verdict == NOT_SUPPORTED and "failed 2 / 0" in verdict.figure


def test_best_alpha_follows_the_width_both_ways():
    assert judge_alpha_width(grid({32: 1.0, 64: 0.2})).verdict == SUPPORTED
    # one alpha0 everywhere: the width does not matter
    assert judge_alpha_width(grid({32: 1.0, 64: 1.0})).verdict == NOT_SUPPORTED
    # the depth changes it at width 32
    deep = grid({32: 1.0, 64: 0.2})
    deep["losses"][32][4] = {**deep["losses"][32][4], 1.0: [2.3] * 3, 5.0: [2.0] * 3}
    verdict = judge_alpha_width(deep)
    assert verdict.verdict == NOT_SUPPORTED and "width 32 x 4 blocks: 5" in verdict.figure
    # every alpha0 within noise of the others: nothing to tell
    flat = grid({32: 1.0, 64: 0.2}, others=2.01)
    verdict = judge_alpha_width(flat)
    assert verdict.verdict == INCONCLUSIVE and "within noise" in verdict.figure


def test_a_missing_run_leaves_both_unjudged():
    data = grid({32: 1.0, 64: 0.2})
    data["losses"][64][4][5.0][1] = None
    assert judge_dyt_matches(data).verdict == INCONCLUSIVE
    assert judge_alpha_width(data).verdict == INCONCLUSIVE
    del data["losses"][64][2]["layernorm"]
    assert "missing" in judge_dyt_matches(data).figure
