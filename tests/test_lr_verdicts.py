import math

from normexp import lr_verdicts
from normexp.verdicts import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED


def test_qk_sensitivity_judge_pairs_seeds_at_every_width():
    judge = lr_verdicts.judge_qk_sensitivity

    def widths(*gains):  # one width per list of per-seed gains, off = 0.5 + gain
        return {16 * 2 ** i: {"off": {s: 0.5 + g for s, g in enumerate(gain)},
                              "per_head": {s: 0.5 for s in range(len(gain))}}
                for i, gain in enumerate(gains)}
    assert judge(widths([0.1, 0.05], [0.2, 0.3])).verdict == SUPPORTED
    assert judge(widths([0.1, 0.05], [-0.01, 0.0])).verdict == NOT_SUPPORTED  # not at width 32
    assert judge(widths([0.1, 0.05], [0.2, -0.01])).verdict == INCONCLUSIVE  # one seed worse
    assert judge(widths([0.01, 0.015], [0.2, 0.3])).verdict == INCONCLUSIVE  # below the floor
    figure = judge(widths([0.1, 0.05])).figure
    assert "width 16: 0.575 -> 0.500 [+0.050, +0.100]" in figure
    # seeds pair by name, not by position
    named = {16: {"off": {0: 0.6, 2: 0.7}, "per_head": {2: 0.5, 0: 0.5}}}
    assert judge(named).verdict == SUPPORTED and "[+0.100, +0.200]" in judge(named).figure
    # a seed one side lacks is not left out: a verdict on the others could differ
    uneven = judge({16: {"off": {0: 0.6, 1: 0.4, 2: 0.6}, "per_head": {0: 0.5, 2: 0.5}}})
    assert uneven.verdict == INCONCLUSIVE
    assert uneven.figure == "inconclusive: 1 of 6 runs missing (16 per_head seed 1)"
    assert "2 of 4 runs missing" in judge({16: {"off": {0: 0.6}, "per_head": {1: 0.5}}}).figure


def _run(lr, seed, loss, logit, qk="off", train=None, width=16):
    """A logged run: 5 log steps, its train losses and max attention logits."""
    return {"width": width, "qk_norm": qk, "lr": lr, "seed": seed, "loss": loss,
            "diverged": not math.isfinite(loss), "steps": [0, 10, 20, 30, 40],
            "train_loss": train or [5.5, 3.0, 2.5, 2.2, 2.0], "logit_max": logit}


FLAT = [0.1, 0.5, 1.0, 1.2, 1.5]


def test_logit_growth_judge_times_the_growth_against_the_failure():
    judge = lr_verdicts.judge_logit_growth
    best = [_run(1e-3, s, 2.0, FLAT) for s in (0, 1)]
    spiking = [5.5, 3.0, 4.0, 4.5, 4.4]  # behind the best lr's loss from step 20
    early = [0.1, 50.0, 1e3, 1e4, 1e4]  # 10x (at least 10) by step 10
    late = [0.1, 0.5, 1.0, 50.0, 1e3]  # only from step 30
    twins = [_run(1e-1, s, 2.1, [3.0] * 5, qk="per_head") for s in (0, 1)]
    grew = judge(best + twins + [_run(1e-1, s, 4.4, early, train=spiking) for s in (0, 1)])
    assert grew.verdict == SUPPORTED
    assert "2 of 4 runs without qk-norm failed, 2 of them before the end; in 2 of those" in \
        grew.figure
    assert "control: it grew in 0 of the 2 runs" in grew.figure
    assert "median: 1e+04 (the same runs with qk-norm: 3)" in grew.figure
    assert judge(best + [_run(1e-1, s, 4.4, late, train=spiking) for s in (0, 1)]).verdict \
        == NOT_SUPPORTED
    assert judge(best + [_run(1e-1, 0, 4.4, early, train=spiking),
                         _run(1e-1, 1, 4.4, late, train=spiking),
                         *(_run(3e-1, s, math.inf, early, train=spiking) for s in (0, 1))]
                 ).verdict == INCONCLUSIVE  # 3 of the 4 failed runs grew first
    # a run that only ends worse: nothing to time the growth against (it was judged supported)
    ends_worse = judge(best + [_run(1e-1, s, 2.5, late) for s in (0, 1)])
    assert ends_worse.verdict == INCONCLUSIVE and "0 of them before the end" in ends_worse.figure
    # nothing failed: nothing to explain; and a low lr that has not converged is not a failure
    assert judge(best + [_run(1e-1, s, 2.05, early) for s in (0, 1)]).verdict == INCONCLUSIVE
    assert judge(best + [_run(1e-4, s, 4.0, FLAT) for s in (0, 1)]).verdict == INCONCLUSIVE
    # no logits logged (log.attention off): nothing to time, not a refutation
    blind = judge([_run(1e-3, 0, 2.0, [math.nan] * 5), _run(1e-1, 0, 4.4, [math.nan] * 5)])
    assert blind.verdict == INCONCLUSIVE and "not logged" in blind.figure


def test_logit_growth_judge_has_a_control_arm():
    """Growth in every failed run meant "supported" even where the runs that trained fine grew
    as much: the rule now asks that the healthy runs at those widths mostly did not."""
    judge = lr_verdicts.judge_logit_growth
    spiking, early = [5.5, 3.0, 4.0, 4.5, 4.4], [0.1, 50.0, 1e3, 1e4, 1e4]
    failed = [_run(1e-1, s, 4.4, early, train=spiking) for s in (0, 1)]
    quiet_best = [_run(1e-3, s, 2.0, FLAT) for s in (0, 1)]
    assert judge(quiet_best + failed).verdict == SUPPORTED
    # two healthy runs above the best lr grew too: 2 of 4 in the control
    grown = [_run(1e-2, s, 2.05, early) for s in (0, 1)]
    some = judge(quiet_best + grown + failed)
    assert some.verdict == INCONCLUSIVE and "it grew in 2 of the 4 runs" in some.figure
    # every healthy run grew: the growth tells failed runs from healthy ones not at all
    everywhere = judge([_run(1e-3, s, 2.0, early) for s in (0, 1)] + grown + failed)
    assert everywhere.verdict == NOT_SUPPORTED
    # below the best lr is no control: those runs train slowly, whatever their logits
    slow = [_run(1e-4, s, 2.08, early) for s in (0, 1)]
    assert judge(quiet_best + slow + failed).verdict == SUPPORTED



# --- incomplete input: an arm, a seed or a run missing --------------------------------------

def _inconclusive(verdict, figure):
    assert verdict.verdict == INCONCLUSIVE and figure in verdict.figure, verdict.figure
    assert verdict.figure.startswith("inconclusive: ")


def test_qk_sensitivity_judge_without_the_off_arm_is_inconclusive():
    """`normexp claims --quick` once ended in KeyError: 'off' here: width 16's runs without
    qk-norm had not been trained."""
    seeds = {0: 0.5, 1: 0.5}
    by_width = {16: {"per_head": seeds}, 32: {"off": {0: 0.7, 1: 0.8}, "per_head": seeds}}
    _inconclusive(lr_verdicts.judge_qk_sensitivity(by_width),
                  "2 of 8 runs missing (16 off seed 0, 16 off seed 1)")
    _inconclusive(lr_verdicts.judge_qk_sensitivity({}), "no runs to judge")


def test_logit_growth_judge_without_a_failed_runs_reference_is_inconclusive():
    spiking, early = [5.5, 3.0, 4.0, 4.5, 4.4], [0.1, 50.0, 1e3, 1e4, 1e4]
    runs = [_run(1e-3, 0, 2.0, FLAT)] + [_run(1e-1, s, 4.4, early, train=spiking)
                                         for s in (0, 1)]  # seed 1 at the best lr: StopIteration
    _inconclusive(lr_verdicts.judge_logit_growth(runs), "1 of 4 runs missing (width 16 lr 0.001 "
                                                     "seed 1)")
    _inconclusive(lr_verdicts.judge_logit_growth([]), "no runs to judge")


LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


def test_higher_lr_judge_both_ways():
    def stable(*per_width):  # (qk_norm, +softcap, qkv) per width
        return {w: dict(zip(("qk_norm", "qk_norm+softcap", "qkv"), lrs))
                for w, lrs in zip((16, 32, 64), per_width)}
    judge = lr_verdicts.judge_higher_lr
    verdict = judge(stable((3e-3, 1e-2, 1e-2), (3e-3, 3e-2, 1e-2), (1e-2, 1e-2, 3e-2)), LRS)
    assert verdict.verdict == SUPPORTED and "width 32: 0.003 / 0.03 / 0.01" in verdict.figure
    # one setup below QK-norm alone at one width, or never above it
    assert judge(stable((3e-3, 1e-2, 1e-2), (3e-3, 1e-3, 1e-2), (1e-2, 3e-2, 3e-2)),
                 LRS).verdict == NOT_SUPPORTED
    assert judge(stable((3e-3, 3e-3, 1e-2), (3e-3, 3e-3, 1e-2), (1e-2, 1e-2, 3e-2)),
                 LRS).verdict == NOT_SUPPORTED
    # higher at one width of three, equal at the others: neither
    assert judge(stable((3e-3, 1e-2, 1e-2), (3e-3, 3e-3, 3e-3), (1e-2, 1e-2, 1e-2)),
                 LRS).verdict == INCONCLUSIVE
    no_qkv = stable((3e-3, 1e-2, 1e-2))
    del no_qkv[16]["qkv"]
    assert judge(no_qkv, LRS).verdict == INCONCLUSIVE
