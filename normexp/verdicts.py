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
FAIL = 0.1  # nats: a run this much worse than its setup's best learning rate failed
GROWTH = 10.0  # the max attention logit grew: to this many times its step-0 value (at least 1)


@dataclasses.dataclass(frozen=True)
class Verdict:
    verdict: str
    figure: str
    rule: str


def _mean_finite(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else math.inf


def _noise(*groups):
    """Seed noise: twice the largest std across seeds in any group, at least NOISE_FLOOR."""
    stds = [float(np.std([v for v in g if math.isfinite(v)])) for g in groups
            if sum(math.isfinite(v) for v in g) > 1]
    return max([NOISE_FLOOR] + [2 * s for s in stds])


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


def _missing_runs(tree, *arms):
    """INCONCLUSIVE if `tree` lacks runs (completeness.grid_gaps), else None."""
    gaps, total = grid_gaps(tree, *arms)
    return incomplete(gaps, total) if gaps or not total else None


def _missing_values(numbers, keys, what="measurements"):
    """INCONCLUSIVE if a measurement the judge reads is absent, else None."""
    gaps = value_gaps(numbers, keys)
    return incomplete(gaps, len(keys), what) if gaps or not keys else None


# -- 1. gradient norm vs depth at initialisation (Xiong et al. 2020) --------------------------

def judge_init_gradients(ratios):
    """ratios: {"pre": [last/first per seed], "post": [...]}."""
    if missing := _missing_runs(ratios, ("pre", "post")):
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
    if missing := _missing_runs(last, ("pre", "post")):
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
    if missing := _missing_runs(numbers.get("losses"), ("pre", "post"), ("none", "warmup")) \
            or _missing_values(numbers, ("unigram",)):
        return missing
    losses, unigram = numbers["losses"], numbers["unigram"]
    fails = {p: {w: sum(_failed(v, unigram) for v in losses[p][w]) for w in losses[p]}
             for p in losses}
    trained = [[v for v in group if not _failed(v, unigram)]
               for p in losses.values() for group in p.values()]
    noise = _noise(*trained)  # the spread of runs that trained: a stall is an outcome, not noise
    penalty = {p: _mean_finite(losses[p]["none"]) - _mean_finite(losses[p]["warmup"])
               for p in losses}
    figure = "; ".join(
        f"{p.capitalize()}-Norm without warmup: {penalty[p]:+.3f} nats vs with warmup, failed "
        f"{fails[p]['none']} vs {fails[p]['warmup']} of {len(losses[p]['none'])} seeds"
        for p in ("post", "pre")) + f" (failed: diverged or within {STALL} of the unigram " \
        f"loss {unigram:.2f}); seed noise {noise:.3f}"
    rule = ("penalty = mean final val loss without warmup - with warmup; supported if Post-Norm "
            "without warmup fails in more seeds or has penalty > noise, while Pre-Norm without "
            "warmup fails in no more seeds and has penalty <= noise; not supported if Post-Norm "
            "fails no more and has penalty < noise / 2, or Pre-Norm fails more or has penalty > "
            "2 x noise; else inconclusive")
    post_worse = fails["post"]["none"] > fails["post"]["warmup"] or penalty["post"] > noise
    post_same = fails["post"]["none"] <= fails["post"]["warmup"] and penalty["post"] < noise / 2
    pre_fine = fails["pre"]["none"] <= fails["pre"]["warmup"] and penalty["pre"] <= noise
    pre_needs = fails["pre"]["none"] > fails["pre"]["warmup"] or penalty["pre"] > 2 * noise
    if post_worse and pre_fine:
        return Verdict(SUPPORTED, figure, rule)
    if post_same or pre_needs:
        return Verdict(NOT_SUPPORTED, figure, rule)
    return Verdict(INCONCLUSIVE, figure, rule)


def judge_rmsnorm(numbers):
    """numbers: losses {layernorm, rmsnorm: [per seed]}, op_ratio and step_ratio (rms / ln)."""
    if missing := _missing_runs(numbers.get("losses"), ("layernorm", "rmsnorm")) or \
            _missing_values(numbers, ("op_ratio", "step_ratio")):
        return missing
    losses, op, step = numbers["losses"], numbers["op_ratio"], numbers["step_ratio"]
    noise = _noise(losses["layernorm"], losses["rmsnorm"])
    gap = _mean_finite(losses["rmsnorm"]) - _mean_finite(losses["layernorm"])
    figure = (f"val loss RMSNorm - LayerNorm = {gap:+.3f} nats (seed noise {noise:.3f}); time "
              f"RMSNorm / LayerNorm: norm op {op:.2f}, train step {step:.2f}")
    rule = ("supported if |loss gap| <= noise and the norm op's time ratio < 0.95; not supported "
            "if RMSNorm's loss is worse by > noise or its op is not faster (ratio >= 1); else "
            "inconclusive")
    if abs(gap) <= noise and op < 0.95:
        return Verdict(SUPPORTED, figure, rule)
    if gap > noise or op >= 1.0:
        return Verdict(NOT_SUPPORTED, figure, rule)
    return Verdict(INCONCLUSIVE, figure, rule)


# -- 4. BatchNorm: train and eval differ; one sample of one token has zero variance -----------

def judge_batchnorm(numbers):
    """numbers: train_eval_rel (|loss(batch stats) - loss(running stats)| / loss(running)),
    single_variance (BatchNorm's batch variance on one token), single_spread (max output
    difference of BatchNorm for two different single tokens), layernorm_spread (the same for
    LayerNorm, the contrast)."""
    if missing := _missing_values(numbers, ("train_eval_rel", "single_variance",
                                            "single_spread", "layernorm_spread")):
        return missing
    rel, var, spread = numbers["train_eval_rel"], numbers["single_variance"], numbers[
        "single_spread"]
    figure = (f"loss with batch statistics vs running averages differs by {100 * rel:.2f}%; "
              f"batch of one token: variance {var:.1e}, outputs for two different tokens differ "
              f"by {spread:.1e} (LayerNorm: {numbers['layernorm_spread']:.2f})")
    rule = ("train and eval differ if their losses differ by > 0.1% (float rounding is ~1e-6); "
            "one token breaks it if the variance is 0 and the output does not depend on the "
            "input (difference < 1e-6); supported if both; not supported if the losses agree "
            "within 1e-5 or the single-token output depends on the input; else inconclusive")
    breaks = var == 0.0 and spread < 1e-6
    if rel > 1e-3 and breaks:
        return Verdict(SUPPORTED, figure, rule)
    if rel < 1e-5 or not breaks:
        return Verdict(NOT_SUPPORTED, figure, rule)
    return Verdict(INCONCLUSIVE, figure, rule)


def judge_leak(leaks):
    """leaks: {norm kind: max relative change of earlier positions' logits}."""
    if missing := _missing_values(leaks, ("layernorm", "rmsnorm", "batchnorm", "instancenorm")):
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


def judge_kurtosis(kurtosis):
    """kurtosis: excess kurtosis per block (first to last) of one placement's trained models."""
    if missing := _missing_values(dict(enumerate(kurtosis)), range(len(kurtosis)), "blocks"):
        return missing
    k = np.abs(np.asarray(kurtosis, float))
    rho = _spearman(np.arange(len(k)), k)
    figure = (f"|excess kurtosis| first block {k[0]:.2f}, last {k[-1]:.2f}; Spearman rho "
              f"(depth, |kurtosis|) {rho:+.2f}")
    rule = ("supported if |kurtosis| falls with depth (rho <= -0.5 and last < first); not "
            "supported if it rises (rho >= 0.5 and last > first); else inconclusive")
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
    if missing := _missing_values(numbers, ("output_change", "grad_scaling", "control_change")):
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


# -- 8. qk-layernorm and learning-rate sensitivity (Wortsman et al. 2023) --------------------

def judge_qk_sensitivity(by_width):
    """by_width: {width: {"off": {seed: LR sensitivity}, "per_head": {seed: ...}}} of one
    placement; LR sensitivity = E_lr[min(loss(lr), loss_0) - loss*] over the swept lrs. Seeds
    are paired by name; one that a side lacks makes the data incomplete."""
    if missing := _missing_runs(by_width, None, ("off", "per_head")):
        return missing
    widths = sorted(by_width, key=int)
    pairs = {w: [(by_width[w]["off"][s], by_width[w]["per_head"][s])
                 for s in sorted(by_width[w]["off"])] for w in widths}
    gains = {w: [off - on for off, on in pairs[w]] for w in widths}
    figure = "LR sensitivity without -> with qk-norm (each seed's, mean) [gain min, max]: " + \
        ", ".join(f"width {w}: {np.mean([p[0] for p in pairs[w]]):.3f} -> "
                  f"{np.mean([p[1] for p in pairs[w]]):.3f} [{min(gains[w]):+.3f}, "
                  f"{max(gains[w]):+.3f}]" for w in widths)
    rule = (f"gain = sensitivity without - with qk-norm, per seed (the same seed's data and "
            f"init); supported if at every width every seed's gain > 0 and the mean gain > "
            f"{NOISE_FLOOR}; not supported if at some width no seed's gain is > 0; else "
            f"inconclusive")
    if all(min(g) > 0 and np.mean(g) > NOISE_FLOOR for g in gains.values()):
        return Verdict(SUPPORTED, figure, rule)
    if any(max(g) <= 0 for g in gains.values()):
        return Verdict(NOT_SUPPORTED, figure, rule)
    return Verdict(INCONCLUSIVE, figure, rule)


def _growth_step(run):
    """The first logged step whose max attention logit is GROWTH x its step-0 value (or 1)."""
    threshold = GROWTH * max(abs(run["logit_max"][0]), 1.0)
    return next((s for s, v in zip(run["steps"], run["logit_max"]) if v >= threshold), None)


def _failure_step(run, best):
    """The first logged step at which the run's train loss is not finite or above that of its
    width's best-lr run of the same seed (the same batches) by > FAIL; the last step when
    only the final loss shows the failure."""
    reference = dict(zip(best["steps"], best["train_loss"]))
    for step, loss in zip(run["steps"], run["train_loss"]):
        if not math.isfinite(loss) or loss - reference.get(step, math.inf) > FAIL:
            return step
    return run["steps"][-1]


def _peak(runs):
    peaks = [np.nanmax(r["logit_max"]) for r in runs if np.isfinite(r["logit_max"]).any()]
    return f"{np.median(peaks):.3g}" if peaks else "none"


def judge_logit_growth(runs):
    """runs: one placement's runs, each {width, qk_norm, lr, seed, loss (final, clipped at
    loss_0), diverged, steps, train_loss and logit_max (max over blocks) at the logged steps}."""
    off = [r for r in runs if r["qk_norm"] == "off"]
    grid = {}  # a failing run is timed against its seed's run at its width's best lr
    for r in off:
        grid.setdefault(f"width {r['width']}", {}).setdefault(f"lr {r['lr']:g}", {})[
            r["seed"]] = r["loss"]
    if missing := _missing_runs(grid):
        return missing
    if not all(r["logit_max"] and math.isfinite(r["logit_max"][0]) for r in off):
        return Verdict(INCONCLUSIVE, "the max attention logit was not logged at step 0 of "
                       "every run (log.attention)", "needs the attention logits")
    best = {}  # width -> (lr, seed-mean clipped loss) of its best learning rate
    for w in {r["width"] for r in off}:
        lrs = sorted({r["lr"] for r in off if r["width"] == w})
        means = [np.mean([r["loss"] for r in off if (r["width"], r["lr"]) == (w, lr)])
                 for lr in lrs]
        best[w] = (lrs[int(np.argmin(means))], min(means))
    failing = [r for r in off if r["lr"] > best[r["width"]][0] and (
        r["diverged"] or r["loss"] - best[r["width"]][1] > FAIL)]
    grew_first = 0
    for r in failing:
        reference = next(b for b in off if (b["width"], b["seed"], b["lr"]) == (
            r["width"], r["seed"], best[r["width"]][0]))
        grew = _growth_step(r)
        grew_first += grew is not None and grew <= _failure_step(r, reference)
    twins = [r for r in runs if r["qk_norm"] != "off" and any(
        (f["width"], f["lr"], f["seed"]) == (r["width"], r["lr"], r["seed"]) for f in failing)]
    figure = (f"{len(failing)} of {len(off)} runs without qk-norm failed; in {grew_first} of "
              f"them the max attention logit had grown {GROWTH:g}x by the step their loss "
              f"fell behind; peak max logit, median: {_peak(failing)} (the same runs with "
              f"qk-norm: {_peak(twins)})")
    rule = (f"a run without qk-norm failed if its lr is above its width's best and it diverged "
            f"or ended > {FAIL} nats above the best; its loss fell behind at the first logged "
            f"step its train loss was > {FAIL} above the best lr's (same seed, same batches), "
            f"else at the end; supported if some run failed and in every failed run the max "
            f"attention logit reached {GROWTH:g}x its step-0 value (or {GROWTH:g}) by then; "
            f"not supported if it had not in at least half; else inconclusive (or no run "
            f"failed)")
    if failing and grew_first == len(failing):
        return Verdict(SUPPORTED, figure, rule)
    if failing and grew_first <= len(failing) / 2:
        return Verdict(NOT_SUPPORTED, figure, rule)
    return Verdict(INCONCLUSIVE, figure, rule)
