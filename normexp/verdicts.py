"""The judges of `normexp claims`: pure functions from a study's numbers to a `Verdict`
(supported / not supported / inconclusive, the measured figure as text, and the rule applied).

Each rule is stated in the verdict it returns and was fixed before the study ran; a test feeds
every judge numbers on both sides of its rule, so nothing in a verdict is written by hand.
Incomplete numbers (an arm, a seed or a value missing) get "inconclusive: N of M runs missing".
"""

import dataclasses
import math

import numpy as np

from normexp.completeness import grid_gaps, value_gaps

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
GROWS, FLAT = 1.5, 1.25  # last/first gradient-norm ratios for "grows" and "flat or falling"
NOISE_FLOOR = 0.02  # nats: loss differences below this count as equal even with identical seeds
STALL = 0.1  # nats: a final loss this close to the unigram entropy learned nothing of context
LEAK = 1e-4  # relative logit change that counts as a leak (a causal model shows exactly 0)
SLOPE_TOL = 0.25  # how far a seed's log-log slope may sit from Theorem 1's (Xiong et al.)
ALPHA = 0.05  # one arm fails in more seeds than another: Fisher's exact test at this level


@dataclasses.dataclass(frozen=True)
class Verdict:
    verdict: str
    figure: str
    rule: str


def _mean(values):
    """The mean, NaN for no values (every comparison with it is False: no verdict rests on it)."""
    return float(np.mean(values)) if len(values) else math.nan


def _noise(*groups):
    """Seed noise: twice the largest std across seeds in any group, at least NOISE_FLOOR. The
    groups hold finite losses: the callers count a diverged or stalled seed as a failure."""
    stds = [float(np.std(g)) for g in groups if len(g) > 1]
    return max([NOISE_FLOOR] + [2 * s for s in stds])


def fails_more(a, n_a, b, n_b):
    """One-sided p of Fisher's exact test: the chance that `a` or more of the a + b failures
    land in the arm of n_a seeds (the other has n_b) if failing had nothing to do with the arm.
    With 3 seeds per arm only 3 failures against 0 reach 0.05; with 5, 4 against 0 or 5
    against 1 do."""
    k = a + b
    return sum(math.comb(n_a, i) * math.comb(n_b, k - i)
               for i in range(a, min(k, n_a) + 1)) / math.comb(n_a + n_b, k)


def _geomean(values):
    return float(np.exp(np.mean(np.log(values))))


# -- incomplete input: no verdict on part of a study -----------------------------------------

def incomplete(missing, total, what="runs", where=None):
    """INCONCLUSIVE for a study that lacks `missing` (labels) of its `total` runs: the rest
    could give another verdict than the whole, so none is given."""
    at, more = f" in {where}" if where else "", len(missing) - 4
    figure = (f"inconclusive: {len(missing)} of {total} {what} missing{at} ("
              f"{', '.join(map(str, missing[:4]))}{f' and {more} more' if more > 0 else ''})"
              if total else f"inconclusive: no {what} to judge{at}")
    return Verdict(INCONCLUSIVE, figure, "a verdict needs all of its study's numbers, as one "
                   "on part of them could differ; `normexp claims` again trains the missing runs "
                   "and reuses the finished ones")


def missing_runs(tree, *arms):
    """INCONCLUSIVE if `tree` lacks runs (completeness.grid_gaps), else None."""
    gaps, total = grid_gaps(tree, *arms)
    return incomplete(gaps, total) if gaps or not total else None


def missing_values(numbers, keys, what="measurements"):
    """INCONCLUSIVE if a measurement the judge reads is absent, else None."""
    gaps = value_gaps(numbers, keys)
    return incomplete(gaps, len(keys), what) if gaps or not keys else None


# -- 1. gradient norm vs depth at initialisation (Xiong et al. 2020) --------------------------

def judge_init_gradients(ratios):
    """ratios: {"pre": [last/first per seed], "post": [...]}."""
    if missing := missing_runs(ratios, ("pre", "post")):
        return missing
    post, pre = ratios["post"], ratios["pre"]
    figure = (f"last/first block gradient norm, geometric mean over {len(post)} seeds: Post-Norm "
              f"{_geomean(post):.2f} [{min(post):.2f}-{max(post):.2f}], Pre-Norm "
              f"{_geomean(pre):.2f} [{min(pre):.2f}-{max(pre):.2f}]")
    rule = (f"supported if Post-Norm's ratio > {GROWS} and Pre-Norm's < {FLAT} in every seed; "
            f"not supported if Post-Norm's < {FLAT} in every seed or Pre-Norm's > {GROWS} in "
            f"every seed; else inconclusive")
    if min(post) > GROWS and max(pre) < FLAT:
        return Verdict(SUPPORTED, figure, rule)
    if max(post) < FLAT or min(pre) > GROWS:
        return Verdict(NOT_SUPPORTED, figure, rule)
    return Verdict(INCONCLUSIVE, figure, rule)


def depth_slopes(last):
    """{placement: {L: [seed]}} -> {placement: [seed]}: the least-squares slope of log of the
    last block's gradient against log L, per seed."""
    slopes = {}
    for placement, by_depth in last.items():
        depths = sorted(by_depth, key=int)
        per_seed = np.array([by_depth[L] for L in depths], float).T  # [seed, depth]
        x = np.log([int(L) for L in depths])
        slopes[placement] = [float(np.polyfit(x, np.log(row), 1)[0]) for row in per_seed]
    return slopes


def judge_depth_slope(last):
    """last: {"pre": {L: [last block's ||E[grad W2]|| per seed]}, "post": {...}}."""
    if missing := missing_runs(last, ("pre", "post")):
        return missing
    slopes = depth_slopes(last)
    pre, post = slopes["pre"], slopes["post"]
    depths = sorted(int(L) for L in last["pre"])
    show = lambda s: f"{np.mean(s):.2f} [{min(s):.2f}, {max(s):.2f}]"
    figure = (f"log-log slope of the last block's ||E[grad W2]|| against L = {depths[0]}.."
              f"{depths[-1]}, mean [min, max] over {len(pre)} seeds: Pre-LN {show(pre)}, "
              f"Post-LN {show(post)} (Theorem 1: -0.5 and 0)")
    rule = (f"supported if every seed's slope is within {SLOPE_TOL} of Theorem 1's (-1/2 for "
            f"Pre-LN, 0 for Post-LN); not supported if every Pre-LN slope is above "
            f"-{SLOPE_TOL} (no fall with depth) or every Post-LN slope is below -{SLOPE_TOL} "
            f"(falls like Pre-LN's); else inconclusive")
    if all(abs(s + 0.5) <= SLOPE_TOL for s in pre) and all(abs(s) <= SLOPE_TOL for s in post):
        return Verdict(SUPPORTED, figure, rule)
    if min(pre) > -SLOPE_TOL or max(post) < -SLOPE_TOL:
        return Verdict(NOT_SUPPORTED, figure, rule)
    return Verdict(INCONCLUSIVE, figure, rule)


# -- 2. Post-Norm needs warmup, Pre-Norm does not --------------------------------------------

def _failed(loss, unigram):
    """Diverged, or stalled near the unigram entropy (the loss of ignoring the context)."""
    return not math.isfinite(loss) or loss > unigram - STALL


def judge_warmup(numbers):
    """numbers: losses {"pre"|"post": {"warmup"|"none": [final val loss per seed, inf if
    diverged, None if it did not finish]}} and unigram (the corpus's unigram entropy, nats)."""
    if missing := missing_runs(numbers.get("losses"), ("pre", "post"), ("none", "warmup")) \
            or missing_values(numbers, ("unigram",)):
        return missing
    losses, unigram = numbers["losses"], numbers["unigram"]
    seeds = {p: {w: len(losses[p][w]) for w in losses[p]} for p in losses}
    fails = {p: {w: sum(_failed(v, unigram) for v in losses[p][w]) for w in losses[p]}
             for p in losses}
    trained = {p: {w: [v for v in losses[p][w] if not _failed(v, unigram)] for w in losses[p]}
               for p in losses}
    # the spread of runs that trained: a failure is an outcome, counted apart, not noise
    noise = _noise(*(group for p in trained.values() for group in p.values()))
    penalty = {p: _mean(trained[p]["none"]) - _mean(trained[p]["warmup"]) for p in losses}
    more = {p: fails_more(fails[p]["none"], seeds[p]["none"], fails[p]["warmup"],
                          seeds[p]["warmup"]) for p in losses}
    figure = "; ".join(
        f"{p.capitalize()}-Norm without warmup failed in {fails[p]['none']} of "
        f"{seeds[p]['none']} seeds, with warmup in {fails[p]['warmup']} of "
        f"{seeds[p]['warmup']} (p = {more[p]:.2f}); penalty {penalty[p]:+.3f} nats"
        for p in ("post", "pre")) + f" (failed: diverged or within {STALL} of the unigram " \
        f"loss {unigram:.2f}; penalty over the seeds that trained, nan where an arm has none); " \
        f"seed noise {noise:.3f}"
    rule = (f"a seed failed if it diverged or ended within {STALL} nats of the unigram loss; an "
            f"arm fails more if Fisher's exact test (one-sided) gives p <= {ALPHA}; penalty = "
            f"mean final val loss without warmup - with warmup, over the seeds that trained; "
            f"supported if Post-Norm without warmup fails more or has penalty > noise, while "
            f"Pre-Norm without warmup fails in no more seeds and has penalty <= noise; not "
            f"supported if Post-Norm fails in no more seeds and has penalty < noise / 2, or "
            f"Pre-Norm fails more or has penalty > 2 x noise; else inconclusive")
    post_worse = more["post"] <= ALPHA or penalty["post"] > noise
    post_same = fails["post"]["none"] <= fails["post"]["warmup"] and penalty["post"] < noise / 2
    pre_fine = fails["pre"]["none"] <= fails["pre"]["warmup"] and penalty["pre"] <= noise
    pre_needs = more["pre"] <= ALPHA or penalty["pre"] > 2 * noise
    if post_worse and pre_fine:
        return Verdict(SUPPORTED, figure, rule)
    if post_same or pre_needs:
        return Verdict(NOT_SUPPORTED, figure, rule)
    return Verdict(INCONCLUSIVE, figure, rule)


def judge_rmsnorm(numbers):
    """numbers: losses {layernorm, rmsnorm: [per seed, inf if diverged]}, op_ratio and
    step_ratio (rms / ln)."""
    if missing := missing_runs(numbers.get("losses"), ("layernorm", "rmsnorm")) or \
            missing_values(numbers, ("op_ratio", "step_ratio")):
        return missing
    losses, op, step = numbers["losses"], numbers["op_ratio"], numbers["step_ratio"]
    finite = {k: [v for v in losses[k] if math.isfinite(v)] for k in losses}
    diverged = {k: len(losses[k]) - len(finite[k]) for k in losses}
    noise = _noise(finite["layernorm"], finite["rmsnorm"])
    gap = _mean(finite["rmsnorm"]) - _mean(finite["layernorm"])
    figure = (f"val loss RMSNorm - LayerNorm = {gap:+.3f} nats over the seeds that did not "
              f"diverge (seed noise {noise:.3f}); diverged: LayerNorm {diverged['layernorm']} "
              f"of {len(losses['layernorm'])} seeds, RMSNorm {diverged['rmsnorm']} of "
              f"{len(losses['rmsnorm'])}; time RMSNorm / LayerNorm: norm op {op:.2f}, train "
              f"step {step:.2f}")
    rule = ("a diverged seed is a failure, counted, never averaged away: supported if no seed "
            "of either diverged, |loss gap| <= noise and the norm op's time ratio < 0.95; not "
            "supported if RMSNorm diverged in more seeds than LayerNorm, its loss is worse by "
            "> noise, or its op is not faster (ratio >= 1); else inconclusive")
    if not any(diverged.values()) and abs(gap) <= noise and op < 0.95:
        return Verdict(SUPPORTED, figure, rule)
    if diverged["rmsnorm"] > diverged["layernorm"] or gap > noise or op >= 1.0:
        return Verdict(NOT_SUPPORTED, figure, rule)
    return Verdict(INCONCLUSIVE, figure, rule)


# -- 4. BatchNorm: train and eval differ; a batch of one token breaks training mode --------

def judge_batchnorm(numbers):
    """numbers: train_eval_rel (|loss(batch stats) - loss(running stats)| / loss(running)) of the
    trained model on a validation batch; single_train_spread and single_eval_spread (how much
    its logits for batches of one token differ between tokens, relative to their size, with
    batch statistics and with running averages), single_train_loss and single_eval_loss (the
    next-token loss of those one-token batches)."""
    if missing := missing_values(numbers, ("train_eval_rel", "single_train_spread",
                                            "single_eval_spread", "single_train_loss",
                                            "single_eval_loss")):
        return missing
    rel, train, control = (numbers[k] for k in ("train_eval_rel", "single_train_spread",
                                                "single_eval_spread"))
    figure = (f"loss with batch statistics vs running averages differs by {100 * rel:.2f}%; "
              f"batches of one token: the logits differ between tokens by {train:.1e} with "
              f"batch statistics and {control:.2f} with running averages (relative), loss "
              f"{numbers['single_train_loss']:.2f} vs {numbers['single_eval_loss']:.2f} nats")
    rule = ("train and eval differ if their losses differ by > 0.1% (float rounding is ~1e-6); "
            "one token breaks training mode if the trained model's logits for a batch of one "
            "token do not depend on the token (< 1e-6) while with running averages they do (> "
            "1e-3, the control); supported if both; not supported if the losses agree within "
            "1e-5 or training mode's one-token logits depend on the token (> 1e-3); else "
            "inconclusive")
    breaks = train < 1e-6 and control > 1e-3
    if rel > 1e-3 and breaks:
        return Verdict(SUPPORTED, figure, rule)
    if rel < 1e-5 or train > 1e-3:
        return Verdict(NOT_SUPPORTED, figure, rule)
    return Verdict(INCONCLUSIVE, figure, rule)


def judge_leak(leaks):
    """leaks: {norm kind: max relative change of earlier positions' logits}."""
    if missing := missing_values(leaks, ("layernorm", "rmsnorm", "batchnorm", "instancenorm")):
        return missing
    figure = ", ".join(f"{k} {v:.1e}" for k, v in leaks.items())
    rule = (f"supported if batchnorm and instancenorm change earlier logits by > {LEAK} "
            f"(relative) and layernorm and rmsnorm by exactly 0; not supported if either "
            f"leaky norm stays <= {LEAK} or a per-token norm changes them at all")
    leaky = min(leaks["batchnorm"], leaks["instancenorm"])
    tight = max(leaks["layernorm"], leaks["rmsnorm"])
    if leaky > LEAK and tight == 0.0:
        return Verdict(SUPPORTED, figure, rule)
    return Verdict(NOT_SUPPORTED, figure, rule)


# -- 6. The residual stream becomes more Gaussian with depth ----------------------------------

def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if np.std(ra) == 0 or np.std(rb) == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def judge_kurtosis(numbers):
    """numbers: kurtosis (excess kurtosis per block, first to last, seed mean) of one placement's
    trained models, losses (their final val losses, inf if diverged) and unigram."""
    if missing := missing_values(numbers, ("losses", "unigram")):
        return missing
    losses, unigram = numbers["losses"], numbers["unigram"]
    rule = ("a claim about trained models: inconclusive if a run diverged or ended within "
            f"{STALL} nats of the unigram loss; supported if |kurtosis| falls with depth (rho <= "
            "-0.5 and last < first); not supported if it rises (rho >= 0.5 and last > first); "
            "else inconclusive")
    if failed := [v for v in losses if _failed(v, unigram)]:
        return Verdict(INCONCLUSIVE, f"inconclusive: {len(failed)} of {len(losses)} runs did "
                       f"not train (final val loss {', '.join(f'{v:.2f}' for v in failed)}; "
                       f"the unigram loss is {unigram:.2f})", rule)
    kurtosis = numbers.get("kurtosis") or []
    if missing := missing_values(dict(enumerate(kurtosis)), range(len(kurtosis)), "blocks"):
        return missing
    k = np.abs(np.asarray(kurtosis, float))
    rho = _spearman(np.arange(len(k)), k)
    figure = (f"|excess kurtosis| first block {k[0]:.2f}, last {k[-1]:.2f}; Spearman rho "
              f"(depth, |kurtosis|) {rho:+.2f}, over {len(losses)} runs that trained")
    if rho <= -0.5 and k[-1] < k[0]:
        return Verdict(SUPPORTED, figure, rule)
    if rho >= 0.5 and k[-1] > k[0]:
        return Verdict(NOT_SUPPORTED, figure, rule)
    return Verdict(INCONCLUSIVE, figure, rule)


# -- 7. A norm makes the weights feeding it scale-invariant -----------------------------------

def judge_scale_invariance(numbers):
    """numbers: output_change {c: max rel logit change when the q/k weights are scaled by c},
    grad_scaling {c: ||grad at c|| * c / ||grad at 1||}, control_change (scaling the MLP's
    input weights, not followed by a norm)."""
    if missing := missing_values(numbers, ("output_change", "grad_scaling", "control_change")):
        return missing
    changes = numbers["output_change"]
    out = max(changes.values())
    grad = max(abs(v - 1) for v in numbers["grad_scaling"].values())
    control = numbers["control_change"]
    figure = ("scaling the weights into a norm by c changes the logits by " + ", ".join(
        f"{v:.0e} (c={c:g})" for c, v in sorted(changes.items())) + f" (relative) and scales "
        f"their gradient by 1/c within {100 * grad:.2f}%; the same scaling of weights not "
        f"followed by a norm changes them by {control:.2f}")
    rule = ("supported if the logits change by < 1e-3 (only eps breaks the invariance), the "
            "gradient scales as 1/c within 2%, and the control changes by > 1e-2; not supported "
            "if the logits change by > 1e-2 or the gradient is off by > 10%; else inconclusive")
    if out < 1e-3 and grad < 0.02 and control > 1e-2:
        return Verdict(SUPPORTED, figure, rule)
    if out > 1e-2 or grad > 0.1:
        return Verdict(NOT_SUPPORTED, figure, rule)
    return Verdict(INCONCLUSIVE, figure, rule)
