"""The judges of claims 9 and 10 (the depth study, `normexp.depth_study`): pure functions from
its numbers to a `Verdict`, each rule fixed before the study ran and tested on both sides.

A seed that diverged has no trained profile: it is named and the verdict on profiles is
inconclusive (never judged on the other seeds alone); in the loss comparison it is a failure.
"""

import math

import numpy as np

from normexp.verdicts import (INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Verdict, _failed, _geomean,
                              _mean, _noise, incomplete, missing_runs,
                              missing_values)

VAR_GROWTH = 2.0  # last block's output variance / first block's that counts as growing
SEPARATION = 2.0  # geometric-mean ratio between two arms that counts as a difference


def thirds(profile):
    """Mean of a per-block profile over its first and its deepest third (floor(L / 3) blocks,
    at least one each)."""
    n = max(1, len(profile) // 3)
    return float(np.mean(profile[:n])), float(np.mean(profile[-n:]))


def deep_share(damage):
    """The deepest third's share of the pruning damage of the first and deepest thirds, each
    clipped at 0: 0 = only the first blocks matter, 1/2 = equally, NaN = neither does."""
    first, deep = (max(0.0, v) for v in thirds(damage))
    return deep / (first + deep) if first + deep > 0 else math.nan


def _profiles(numbers, arms, key):
    """{arm: [per seed profile]} or a Verdict: inconclusive where a run is missing or a seed
    diverged (no trained model to measure)."""
    if numbers.get("missing") or not numbers.get("of", 1):
        return incomplete(numbers.get("missing", []), numbers.get("of", 0))
    diverged = [f"{a} seed {s}" for a in arms for s, v in enumerate(
        numbers.get("losses", {}).get(a, [])) if v is not None and not math.isfinite(v)]
    if diverged:
        return Verdict(INCONCLUSIVE, f"inconclusive: diverged, so no trained profile: "
                       f"{', '.join(diverged)}", "a profile is measured on a trained model; a "
                       "diverged seed is counted, so none is judged without it")
    tree = {a: numbers.get("profiles", {}).get(a, {}).get(key) for a in arms}
    if gaps := missing_runs(tree, arms):
        return gaps
    return tree


def judge_variance_growth(numbers):
    """Sun et al. 2025: Pre-LN's output variance grows with depth, LNS's much less."""
    profiles = _profiles(numbers, ("pre", "lns"), "var")
    if isinstance(profiles, Verdict):
        return profiles
    growth = {a: [v[-1] / v[0] for v in profiles[a]] for a in profiles}
    gm = {a: _geomean(g) for a, g in growth.items()}
    figure = "; ".join(f"{a}: last/first block output variance {gm[a]:.2f} (seeds "
                       f"{', '.join(f'{g:.2f}' for g in growth[a])})" for a in growth)
    rule = (f"growth = the last block's output variance / the first's, per seed; supported if "
            f"Pre-LN's is >= {VAR_GROWTH:g} in every seed, above LNS's in every pair of seeds, "
            f"and its geometric mean >= {SEPARATION:g}x LNS's; not supported if Pre-LN's "
            f"geometric mean is < {VAR_GROWTH:g} or not above LNS's; else inconclusive")
    if min(growth["pre"]) >= VAR_GROWTH and min(growth["pre"]) > max(growth["lns"]) and \
            gm["pre"] >= SEPARATION * gm["lns"]:
        return Verdict(SUPPORTED, figure, rule)
    if gm["pre"] < VAR_GROWTH or gm["pre"] <= gm["lns"]:
        return Verdict(NOT_SUPPORTED, figure, rule)
    return Verdict(INCONCLUSIVE, figure, rule)


def judge_pruning(numbers):
    """Sun et al. 2025, Fig. 4: Pre-LN's deep blocks can be dropped at little cost; with LNS
    they matter."""
    profiles = _profiles(numbers, ("pre", "lns"), "damage")
    if isinstance(profiles, Verdict):
        return profiles
    share = {a: [deep_share(d) for d in profiles[a]] for a in profiles}
    if missing := missing_values({f"{a} seed {s}": v for a in share
                                  for s, v in enumerate(share[a])}, [
            f"{a} seed {s}" for a in share for s in range(len(share[a]))], "damage shares"):
        return missing  # no third's damage above 0: nothing to share out
    figure = "; ".join(
        f"{a}: deepest third's share of the damage {_mean(s):.2f} (seeds "
        f"{', '.join(f'{v:.2f}' for v in s)}; damage first / deepest third "
        f"{', '.join('%.3f / %.3f' % thirds(d) for d in profiles[a])} nats)"
        for a, s in share.items())
    rule = ("damage = val loss with one block skipped - the whole model's; share = the deepest "
            "third's mean damage / (the first third's + the deepest third's), each clipped at 0; "
            "supported if Pre-LN's share is < 1/2 in every seed and LNS's is above Pre-LN's in "
            "every pair of seeds; not supported if Pre-LN's mean share is >= 1/2 or LNS's mean "
            "is not above Pre-LN's; else inconclusive")
    if max(share["pre"]) < 0.5 and min(share["lns"]) > max(share["pre"]):
        return Verdict(SUPPORTED, figure, rule)
    if _mean(share["pre"]) >= 0.5 or _mean(share["lns"]) <= _mean(share["pre"]):
        return Verdict(NOT_SUPPORTED, figure, rule)
    return Verdict(INCONCLUSIVE, figure, rule)


def judge_angular(numbers):
    """Li et al. 2024, Fig. 3: deep in a Pre-LN stack a block barely turns the stream (small
    angular distance between consecutive blocks' inputs); Mix-LN's deep blocks turn it more."""
    profiles = _profiles(numbers, ("pre", "mix", "post"), "angular")
    if isinstance(profiles, Verdict):
        return profiles
    ends = {a: [thirds(v) for v in profiles[a]] for a in profiles}
    deep = {a: [d for _, d in e] for a, e in ends.items()}
    figure = "; ".join(f"{a}: angular distance first / deepest third "
                       f"{_mean([f for f, _ in e]):.3f} / {_mean(deep[a]):.3f}"
                       for a, e in ends.items()) + " (mean over seeds)"
    rule = ("angular distance across a block, arccos(cos(x_l, x_l+1)) / pi averaged over "
            "tokens and over the first or deepest third of the blocks; supported if in every "
            "Pre-LN seed the deepest third's is below the first third's and Mix-LN's deepest "
            "third's is above Pre-LN's in every pair of seeds; not supported if Pre-LN's "
            "deepest third's mean is not below its first third's or Mix-LN's is not above "
            "Pre-LN's; else inconclusive (Post-LN: shown for reference)")
    if all(d < f for f, d in ends["pre"]) and min(deep["mix"]) > max(deep["pre"]):
        return Verdict(SUPPORTED, figure, rule)
    if _mean(deep["pre"]) >= _mean([f for f, _ in ends["pre"]]) or \
            _mean(deep["mix"]) <= _mean(deep["pre"]):
        return Verdict(NOT_SUPPORTED, figure, rule)
    return Verdict(INCONCLUSIVE, figure, rule)


def judge_mix_loss(numbers):
    """Li et al. 2024, Table 1: Mix-LN trains at least as well as Pre-LN and Post-LN.
    numbers: losses {placement: [final val loss per seed, inf if diverged]}, unigram."""
    arms = ("mix", "pre", "post")
    if missing := missing_runs(numbers.get("losses"), arms) or \
            missing_values(numbers, ("unigram",)):
        return missing
    losses, unigram = numbers["losses"], numbers["unigram"]
    fails = {a: sum(_failed(v, unigram) for v in losses[a]) for a in arms}
    trained = {a: [v for v in losses[a] if not _failed(v, unigram)] for a in arms}
    noise = _noise(*trained.values())
    gap = {a: _mean(trained["mix"]) - _mean(trained[a]) for a in ("pre", "post")}
    figure = (", ".join(f"{a} {_mean(trained[a]):.3f} ({fails[a]} of {len(losses[a])} failed)"
                        for a in arms) + " mean final val loss; Mix-LN - Pre-LN "
              f"{gap['pre']:+.3f}, - Post-LN {gap['post']:+.3f}; seed noise {noise:.3f}")
    rule = ("a seed failed if it diverged or ended within 0.1 nats of the unigram loss; "
            "supported if Mix-LN fails in no more seeds than Pre-LN and than Post-LN, and its "
            "mean final val loss over the seeds that trained is at most each's + noise (an "
            "arm with every seed failed counts as worse); not supported if Mix-LN fails in "
            "more seeds than either or its mean is above either's by > 2 x noise; else "
            "inconclusive")
    worse = lambda a: fails["mix"] > fails[a] or gap[a] > 2 * noise
    as_good = lambda a: fails["mix"] <= fails[a] and (not trained[a] or gap[a] <= noise)
    if not trained["mix"] or any(worse(a) for a in ("pre", "post")):
        return Verdict(NOT_SUPPORTED, figure, rule)
    if all(as_good(a) for a in ("pre", "post")):
        return Verdict(SUPPORTED, figure, rule)
    return Verdict(INCONCLUSIVE, figure, rule)
