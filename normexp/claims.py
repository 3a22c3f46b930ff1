"""`normexp claims`: published claims about normalization, tested by small studies, with verdicts
computed from what the studies measure.

Each claim has a study (`normexp.studies.measure_*`, which returns plain numbers) and a judge
(`judge_*` here: numbers -> `Verdict`, i.e. supported / not supported / inconclusive, the
measured figure as text, and the rule applied). The judges are pure functions of the numbers,
so a test can feed them numbers on both sides of their rule; nothing in a verdict is written by
hand. `run_claims` runs them all and writes `claims.md` and `claims.json`.
"""

import dataclasses
import json
import math
import os

import numpy as np

from normexp.rundir import write_atomic

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
GROWS, FLAT = 1.5, 1.25  # last/first gradient-norm ratios for "grows" and "flat or falling"
NOISE_FLOOR = 0.02  # nats: loss differences below this count as equal even with identical seeds
STALL = 0.1  # nats: a final loss this close to the unigram entropy learned nothing of context
LEAK = 1e-4  # relative logit change that counts as a leak (a causal model shows exactly 0)
SLOPE_TOL = 0.25  # how far a seed's log-log slope may sit from Theorem 1's (Xiong et al.)


@dataclasses.dataclass(frozen=True)
class Verdict:
    verdict: str
    figure: str
    rule: str


@dataclasses.dataclass(frozen=True)
class Result:
    number: int
    claim: str
    setup: str
    verdict: Verdict
    numbers: dict


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


# -- 1. gradient norm vs depth at initialisation (Xiong et al. 2020) --------------------------

def judge_init_gradients(ratios):
    """ratios: {"pre": [last/first per seed], "post": [...]}."""
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
    diverged]}} and unigram (the corpus's unigram entropy, nats)."""
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


# -- the claims, their setups, and the table ------------------------------------------------

def _shape(scale, layers=None, width=None):
    return (f"{layers or scale.n_layer} blocks x {width or scale.d_model} wide, seq "
            f"{scale.seq_len}, batch {scale.batch_size}, embedded corpus")


def _trained(scale, what):
    return f"{_shape(scale)}, {scale.steps} steps, {scale.seeds} seeds; {what}"


def _claim_1(scale, out):
    from normexp.studies import measure_expected_gradients, measure_init_gradients
    numbers = measure_expected_gradients(scale)
    depth = max(L for L in scale.depths if L <= 12)
    ratios = {p: [w2[-1] / w2[0] for w2 in numbers["profiles"][p][depth]["w2"]]
              for p in ("pre", "post")}
    setup = (f"a decoder-only byte model as a proxy for the paper's translation Transformer: "
             f"{scale.init_width} wide, 4 heads, Xavier init, ReLU, seq {scale.seq_len}, batch "
             f"{scale.batch_size}, ||E[grad]|| over {scale.grad_batches} batches at "
             f"initialisation, {scale.seeds} seeds")
    yield ("Xiong et al. 2020 (Fig. 3a/b): at initialisation the FFN's expected gradient "
           "||E[grad W2]|| grows toward the last block under Post-LN and stays flat under "
           "Pre-LN"), f"{setup}; {depth} blocks", judge_init_gradients(ratios), {
        "ratios": ratios, "depth": depth, "profiles": numbers["profiles"]}
    yield ("Xiong et al. 2020 (Fig. 3c/d, Theorem 1): the last block's ||E[grad W2]|| falls "
           "with depth L as 1/sqrt(L) under Pre-LN and stays constant under Post-LN"), (
        f"{setup}; L in {list(scale.depths)}"), judge_depth_slope(numbers["last_w2"]), {
        "last_w2": numbers["last_w2"], "slopes": depth_slopes(numbers["last_w2"])}
    gpt2 = measure_init_gradients(scale, "gpt2")
    yield ("With GPT-2's init, Post-Norm's whole-block gradient norms grow toward the last "
           "blocks at initialisation while Pre-Norm's stay flat or shrink (the quantity "
           "normexp logs: per batch, the whole block)"), (
        f"{_shape(scale, scale.init_layers, scale.init_width)}, GPT-2 init (N(0, 0.02), "
        f"residual 1/sqrt(2L)), {scale.seeds} seeds, step 0"), judge_init_gradients(
        gpt2["ratios"]), gpt2


def _claim_2(scale, out):
    from normexp.studies import measure_warmup, warmup_overrides
    numbers = measure_warmup(scale, out)
    lr, warmup = (v for k, v in warmup_overrides(scale, "pre", True)[2:])
    yield ("Post-Norm without warmup at a high learning rate diverges or ends worse; Pre-Norm "
           "does not need the warmup"), _trained(
        scale, f"lr {lr:g}, warmup 0 vs {warmup} steps, final val loss"), judge_warmup(
        numbers), numbers


def _claim_3(scale, out):
    from normexp.studies import measure_rmsnorm
    numbers = measure_rmsnorm(scale, out)
    yield ("Zhang & Sennrich 2019: RMSNorm reaches LayerNorm's loss at lower cost"), _trained(
        scale, "Pre-Norm, lr 3e-3; time of the train step and of the norm alone (forward + "
        "backward), median of alternating repeats"), judge_rmsnorm(numbers), numbers


def _claim_4(scale, out):
    from normexp.studies import measure_batchnorm
    numbers = measure_batchnorm(scale, out)
    yield ("BatchNorm: training (batch statistics) and evaluation (running averages) differ, "
           "and normalizing a single sample (batch 1, sequence 1) breaks"), (
        f"{_shape(scale)}, pooled BatchNorm trained {scale.steps} steps, one validation batch; "
        f"the norm alone on one token"), judge_batchnorm(numbers), numbers


def _claim_5(scale, out):
    from normexp.studies import measure_leak
    numbers = measure_leak(scale)
    yield ("BatchNorm and InstanceNorm leak information across positions in a causal language "
           "model; LayerNorm and RMSNorm do not"), (
        f"{_shape(scale)}, Pre-Norm at init, training mode; tokens after position "
        f"{numbers['position']} changed, max change of the logits up to it / max logit"), \
        judge_leak(numbers["leaks"]), numbers


def _claim_6(scale, out):
    from normexp.studies import measure_kurtosis
    for placement in ("pre", "post"):
        numbers = measure_kurtosis(scale, out, placement)
        yield ("The residual stream becomes more Gaussian with depth (excess kurtosis per "
               "block)"), _trained(scale, f"{placement.capitalize()}-Norm (the warmup study's "
                                          f"runs with warmup), last logged step"), \
            judge_kurtosis(numbers["kurtosis"]), numbers


def _claim_7(scale, out):
    from normexp.studies import measure_scale_invariance
    numbers = measure_scale_invariance(scale)
    yield ("A norm makes the weights feeding it scale-invariant, so weight decay changes only "
           "their effective learning rate"), (
        f"{_shape(scale)}, Pre-Norm with per-head QK-norm at init: q/k projection (kernel and "
        f"bias) scaled by c; control: the MLP's input projection scaled by 2"), \
        judge_scale_invariance(numbers), numbers


CLAIMS = {1: _claim_1, 2: _claim_2, 3: _claim_3, 4: _claim_4, 5: _claim_5, 6: _claim_6,
          7: _claim_7}


def run_claims(scale, out, only=None, echo=print):
    """Run the claims (all, or the numbers in `only`), write claims.md and claims.json."""
    results = []
    for number, claim in CLAIMS.items():
        if only and number not in only:
            continue
        for text, setup, verdict, numbers in claim(scale, out):
            results.append(Result(number, text, setup, verdict, numbers))
            echo(f"claim {number}: {verdict.verdict}: {verdict.figure}")
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "claims.md"), markdown(results, scale))
    write_atomic(os.path.join(out, "claims.json"), json.dumps(
        [dataclasses.asdict(r) for r in results], indent=1, default=float) + "\n")
    return results


def markdown(results, scale):
    cell = lambda text: str(text).replace("|", "\\|")
    lines = [f"# Claims checked by normexp ({scale.name} scale)", "",
             "Each verdict is computed by the rule in its row from the figure measured in this "
             "run; the runs behind the training studies are in the subdirectories.", "",
             "| # | claim | setup | measured | verdict | rule |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append("| " + " | ".join(cell(c) for c in (
            r.number, r.claim, r.setup, r.verdict.figure, f"**{r.verdict.verdict}**",
            r.verdict.rule)) + " |")
    return "\n".join(lines) + "\n"
