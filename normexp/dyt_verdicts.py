"""The judges of claim 12 (the DyT study, `normexp.dyt_study`): pure functions from its numbers
to a `Verdict`, each rule fixed before the study ran and tested on both sides.

numbers["losses"]: {width: {depth: {"layernorm" | alpha0: [final val loss per seed, inf if
diverged, None if it did not finish]}}}; numbers["unigram"]: the corpus's unigram entropy. A
seed that diverged or stalled near the unigram loss failed; an arm's mean is over the seeds
that trained, and its failures are counted beside it, never dropped.
"""

import math

from normexp.verdicts import (INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Verdict, _failed, _mean,
                              _noise, missing_runs, missing_values)


def _cells(numbers):
    """{(width, depth): {arm: (mean over the seeds that trained, failures, seeds)}} and the
    seed noise over every arm, or a Verdict where a run is missing."""
    losses = numbers.get("losses")
    if missing := missing_runs(losses) or missing_values(numbers, ("unigram",)):
        return missing, None
    unigram, cells, trained = numbers["unigram"], {}, []
    for width, by_depth in losses.items():
        for depth, arms in by_depth.items():
            for arm, seeds in arms.items():
                ok = [v for v in seeds if not _failed(v, unigram)]
                trained.append(ok)
                cells.setdefault((width, depth), {})[arm] = (
                    _mean(ok) if ok else math.inf, len(seeds) - len(ok), len(seeds))
    return cells, _noise(*trained)


def _best(arms):
    """The DyT alpha0 with the fewest failures, then the lowest mean loss; and the runner-up."""
    ranked = sorted((a for a in arms if a != "layernorm"), key=lambda a: (arms[a][1], arms[a][0]))
    return ranked[0], ranked[1] if len(ranked) > 1 else None


def judge_dyt_matches(numbers):
    """Zhu et al. 2025: DyT (at its best alpha0) matches LayerNorm's loss."""
    cells, noise = _cells(numbers)
    if isinstance(cells, Verdict):
        return cells
    gap, fails = {}, {}
    for cell, arms in cells.items():
        best, _ = _best(arms)
        gap[cell] = arms[best][0] - arms["layernorm"][0]
        fails[cell] = (arms[best][1], arms["layernorm"][1])
    figure = "; ".join(f"width {w} x {d} blocks: DyT - LayerNorm {gap[(w, d)]:+.3f} nats "
                       f"(failed {fails[(w, d)][0]} / {fails[(w, d)][1]})"
                       for w, d in sorted(cells)) + f"; seed noise {noise:.3f}"
    rule = ("per width and depth, DyT at its best alpha0 (fewest failed seeds, then the lowest "
            "mean final val loss over the seeds that trained) against LayerNorm; supported if "
            "everywhere DyT fails in no more seeds and is at most noise above; not supported "
            "if somewhere it fails in more seeds or is more than 2 x noise above; else "
            "inconclusive")
    if any(f[0] > f[1] or gap[c] > 2 * noise for c, f in fails.items()):
        return Verdict(NOT_SUPPORTED, figure, rule)
    if all(gap[c] <= noise for c in cells):
        return Verdict(SUPPORTED, figure, rule)
    return Verdict(INCONCLUSIVE, figure, rule)


def judge_alpha_width(numbers):
    """Zhu et al. 2025, Table 12: the best alpha0 depends on the width, not on the depth."""
    cells, noise = _cells(numbers)
    if isinstance(cells, Verdict):
        return cells
    best, clear = {}, {}
    for cell, arms in cells.items():
        best[cell], second = _best(arms)
        # clear: the runner-up fails more, or ends more than the seed noise behind
        clear[cell] = second is None or arms[second][1] > arms[best[cell]][1] or \
            arms[second][0] - arms[best[cell]][0] > noise
    widths = sorted({w for w, _ in cells})
    by_width = {w: {best[c] for c in cells if c[0] == w} for w in widths}
    figure = "best alpha0: " + "; ".join(
        f"width {w} x {d} blocks: {best[(w, d)]:g}{'' if clear[(w, d)] else ' (within noise)'}"
        for w, d in sorted(cells)) + f"; seed noise {noise:.3f}"
    rule = ("the best alpha0 of a width and depth (fewest failed seeds, then the lowest mean "
            "final val loss) is clear if the runner-up fails more or ends more than the seed "
            "noise behind; supported if every cell is clear, each width has one best alpha0 at "
            "every depth, and the widths' differ; not supported if at some width two clear "
            "cells' best alpha0 differ (the depth matters), or every cell is clear with one "
            "alpha0 at every width (the width does not); else inconclusive")
    depth_matters = any(len({best[c] for c in cells if c[0] == w and clear[c]}) > 1
                        for w in widths)
    if depth_matters or (all(clear.values()) and len(set(best.values())) == 1):
        return Verdict(NOT_SUPPORTED, figure, rule)
    if all(clear.values()) and all(len(b) == 1 for b in by_width.values()) and \
            len({next(iter(b)) for b in by_width.values()}) == len(widths):
        return Verdict(SUPPORTED, figure, rule)
    return Verdict(INCONCLUSIVE, figure, rule)
