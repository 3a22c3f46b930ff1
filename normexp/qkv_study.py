"""Claim 11's study (Rybakov et al. 2024): the shipped sweep `configs/sweeps/qkv_norm.yaml` (QK-norm
alone, QK-norm with a soft cap on the attention logits, and placement `qkv`, each over widths x
learning rates x seeds) run at a `studies.Scale` with claim 8's sizes, and each setup's largest
stable learning rate, for the judge in `normexp.lr_verdicts`.
"""

import os

import numpy as np

from normexp import analysis
from normexp import sweep as sweep_lib
from normexp.completeness import completeness
from normexp.lr_verdicts import FAIL

QKV_SWEEP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                         "sweeps", "qkv_norm.yaml")
SETUP = ("model.placement", "model.qk_norm", "model.attn_softcap")
ZIPPED = ("model.placement", "model.final_norm", "model.qk_norm", "model.attn_softcap")


def setup_name(placement, qk_norm, softcap):
    """'qk_norm', 'qk_norm+softcap' or 'qkv': the sweep's three setups by what they add."""
    if placement == "qkv":
        return "qkv"
    return "qk_norm+softcap" if float(softcap) else "qk_norm" if qk_norm != "off" else placement


def load_runs(path):
    """`analysis.load_runs` of the sweep, with each run's `setup` (`setup_name`)."""
    runs = analysis.load_runs(path)
    runs["setup"] = [setup_name(*row) for row in runs[list(SETUP)].itertuples(index=False)]
    return runs


def qkv_sweep(scale, out):
    """The shipped file at this scale, its runs under `<out>/qkv_norm`: claim 8's sizes (its
    placement and qk_norm settings, where a scale has them, are this sweep's own)."""
    sizes = [(k, v) for k, v in scale.lr_sweep if k not in ZIPPED]
    return sweep_lib.load(QKV_SWEEP, os.path.join(out, "qkv_norm"),
                          settings=(("seeds", scale.seeds), *sizes))


def measure_qkv(scale, out):
    sweep = qkv_sweep(scale, out)
    if sweep_lib.run(sweep, max_parallel=scale.sweep_workers, progress=False) > 128:
        raise KeyboardInterrupt  # a stop request: the claims stop too (the runs resume)
    found = completeness(sweep.out_dir)
    if found["missing"] or not found["of"]:
        return {"stable": {}, "table": [], **found}
    return {**stable_lrs(sweep.out_dir), **found}


def stable_lrs(path):
    """Per width and setup, the largest stable learning rate: the highest lr at or above the
    setup's best (lowest mean clipped final loss over seeds) up to which no seed diverged or
    ended more than FAIL nats above that best. Returns {"stable": {width: {setup: lr}},
    "lrs": the swept lrs, "table": `analysis.lr_sensitivity` rows per width and setup}."""
    runs = load_runs(path)
    runs["_clipped"], runs["_diverged"] = analysis.clipped_losses(runs)
    lrs = sorted(runs["optim.lr"].unique())
    stable = {}
    for (width, setup), group in runs.groupby(["model.d_model", "setup"]):
        mean = group.groupby("optim.lr")["_clipped"].mean()
        best = float(mean.min())
        ok = {lr: bool((~at["_diverged"] & (at["_clipped"] <= best + FAIL)).all())
              for lr, at in group.groupby("optim.lr")}
        top = float(mean.idxmin())
        for lr in lrs[lrs.index(top) + 1:]:
            if not ok.get(lr, False):
                break
            top = lr
        stable.setdefault(int(width), {})[setup] = top
    table = analysis.lr_sensitivity(runs, by=["model.d_model", "setup"])
    return {"stable": stable, "lrs": [float(lr) for lr in lrs],
            "table": table.replace({np.nan: None}).to_dict(orient="records")}
