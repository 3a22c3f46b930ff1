"""The judges of the learning-rate sweeps: claim 8 (Wortsman et al. 2023) with and without
qk-norm, the LR sensitivity and whether the max attention logit grows before the loss fails;
claim 11 (Rybakov et al. 2024), the largest stable learning rate of three attention setups.
Pure functions from `lr_study.lr_sensitivity_numbers` and `qkv_study.stable_lrs` to a
`verdicts.Verdict`, like the others.
"""

import math

import numpy as np

from normexp.verdicts import (INCONCLUSIVE, NOISE_FLOOR, NOT_SUPPORTED, SUPPORTED, Verdict,
                              missing_runs)

FAIL = 0.1  # nats: a run this much worse than its setup's best learning rate failed
GROWTH = 10.0  # the max attention logit grew: to this many times its step-0 value (at least 1)
CONTROL = 0.25  # at most this share of the runs that did not fail may show the growth


def judge_qk_sensitivity(by_width):
    """by_width: {width: {"off": {seed: LR sensitivity}, "per_head": {seed: ...}}} of one
    placement; LR sensitivity = E_lr[min(loss(lr), loss_0) - loss*] over the swept lrs. Seeds
    are paired by name; one that a side lacks makes the data incomplete."""
    if missing := missing_runs(by_width, None, ("off", "per_head")):
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
    """The first logged step before the last at which the run's train loss is not finite or
    above that of its width's best-lr run of the same seed (the same batches) by > FAIL; None
    when only the end shows the failure (nothing to time a growth against)."""
    reference = dict(zip(best["steps"], best["train_loss"]))
    for step, loss in zip(run["steps"][:-1], run["train_loss"][:-1]):
        if not math.isfinite(loss) or loss - reference.get(step, math.inf) > FAIL:
            return step
    return None


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
    if missing := missing_runs(grid):
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
    timed = []  # (run, the step its loss fell behind) for those that fell behind before the end
    for r in failing:
        reference = next(b for b in off if (b["width"], b["seed"], b["lr"]) == (
            r["width"], r["seed"], best[r["width"]][0]))
        if (step := _failure_step(r, reference)) is not None:
            timed.append((r, step))
    grew_first = sum(_growth_step(r) is not None and _growth_step(r) <= step
                     for r, step in timed)
    # the control: runs at the same widths, at or above the best lr, that did not fail
    widths = {r["width"] for r in failing}
    failed = {id(r) for r in failing}
    healthy = [r for r in off if r["width"] in widths and r["lr"] >= best[r["width"]][0]
               and id(r) not in failed]
    healthy_grew = sum(_growth_step(r) is not None for r in healthy)
    twins = [r for r in runs if r["qk_norm"] != "off" and any(
        (f["width"], f["lr"], f["seed"]) == (r["width"], r["lr"], r["seed"]) for f in failing)]
    figure = (f"{len(failing)} of {len(off)} runs without qk-norm failed, {len(timed)} of them "
              f"before the end; in {grew_first} of those the max attention logit had grown "
              f"{GROWTH:g}x by the step their loss fell behind; control: it grew in "
              f"{healthy_grew} of the {len(healthy)} runs at those widths, at or above the best "
              f"lr, that did not fail; peak max logit of the failed runs, median: "
              f"{_peak(failing)} (the same runs with qk-norm: {_peak(twins)})")
    rule = (f"a run without qk-norm failed if its lr is above its width's best and it diverged "
            f"or ended > {FAIL} nats above the best; its loss fell behind at the first logged "
            f"step before the last at which its train loss was > {FAIL} above the best lr's "
            f"(same seed, same batches); the logit grew once it reached {GROWTH:g}x its step-0 "
            f"value (or {GROWTH:g}); supported if some run fell behind before the end, the "
            f"logit of every such run grew by then, and it grew at any step in at most "
            f"{CONTROL:.0%} of the runs that did not fail at or above the best lr of those "
            f"widths (the control); not supported if it grew first in at most half of them or "
            f"as often in the control; else inconclusive (or no run failed before the end)")
    share = grew_first / len(timed) if timed else math.nan
    control = healthy_grew / len(healthy) if healthy else math.nan
    if timed and grew_first == len(timed) and control <= CONTROL:
        return Verdict(SUPPORTED, figure, rule)
    if timed and (share <= 0.5 or control >= share):
        return Verdict(NOT_SUPPORTED, figure, rule)
    return Verdict(INCONCLUSIVE, figure, rule)


def judge_higher_lr(stable, lrs):
    """Rybakov et al. 2024: QK-norm with softmax capping, and a norm after QKV without the
    pre-norm, each train stably at a higher learning rate than QK-norm alone. stable: {width:
    {"qk_norm" | "qk_norm+softcap" | "qkv": the largest stable lr}}; lrs: the swept grid."""
    arms = ("qk_norm", "qk_norm+softcap", "qkv")
    if missing := missing_runs(stable, None, arms):
        return missing
    widths = sorted(stable, key=int)
    step = {w: {a: lrs.index(stable[w][a]) - lrs.index(stable[w]["qk_norm"]) for a in arms[1:]}
            for w in widths}
    figure = "largest stable lr (qk_norm / +softcap / qkv): " + ", ".join(
        f"width {w}: " + " / ".join(f"{stable[w][a]:g}" for a in arms) for w in widths)
    rule = (f"a setup's largest stable lr: the highest swept lr at or above its best at which, "
            f"and at every lr between, no seed diverged or ended > {FAIL} nats above the best "
            f"mean; supported if both +softcap and qkv are higher than QK-norm alone at most "
            f"widths and lower at none; not supported if either is lower at some width or "
            f"higher at none; else inconclusive")
    higher = {a: sum(step[w][a] > 0 for w in widths) for a in arms[1:]}
    lower = {a: sum(step[w][a] < 0 for w in widths) for a in arms[1:]}
    if all(lower[a] == 0 and higher[a] > len(widths) / 2 for a in arms[1:]):
        return Verdict(SUPPORTED, figure, rule)
    if any(lower[a] > 0 or higher[a] == 0 for a in arms[1:]):
        return Verdict(NOT_SUPPORTED, figure, rule)
    return Verdict(INCONCLUSIVE, figure, rule)
