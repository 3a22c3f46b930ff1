"""Claim 12's study (Zhu et al. 2025, "Transformers without Normalization", arXiv 2503.10622):
Pre-LN with DyT, gamma tanh(alpha x) + beta, in place of every LayerNorm, over a grid of alpha0
x width x depth, and LayerNorm at each width and depth as the control. A width and depth's
alpha0s and seeds train as one vectorized group (alpha0 is a learned scalar's starting value,
config.GROUP_KEYS).

The paper trains LLaMA models (widths 1024-8192, depths 8-64, RMSNorm replaced) and finds the
best alpha0 set by the width, not the depth (Table 12), a larger one before attention. Here:
byte-level models on the embedded corpus, one alpha0 at every norm (attention, MLP, final),
LayerNorm and GELU, `Scale.dyt_widths` x `Scale.dyt_depths`, half the other studies' batch,
Xavier init with unit-scale embeddings and lr 1e-3 with warmup for both norms (the paper tunes
DyT's own lr at some sizes).
"""

import dataclasses
import math

import numpy as np

from normexp import data as data_lib
from normexp.completeness import completeness, final_losses
from normexp.metric_names import ACT
from normexp.rundir import read_metrics
from normexp.studies import train_cfgs
from normexp.train import run_group

ALPHAS = (0.2, 1.0, 5.0)  # around DyT's default 0.5, each 5x apart
ALPHA_KEYS = ("model.norm.alpha_attn", "model.norm.alpha_mlp", "model.norm.alpha_final")


def dyt_scale(scale, width, depth):
    return dataclasses.replace(scale, d_model=width, n_layer=depth,
                               batch_size=max(1, scale.batch_size // 2))


def _overrides(scale, kind):
    # Xavier's unit-scale token embeddings in both arms: DyT is not scale-invariant, and with
    # GPT-2's N(0, 0.02) embeddings every DyT run of a probe (64 x 2 blocks, 300 steps, lr
    # 1e-4..3e-3, alpha0 0.05-5) stalled at the unigram loss while LayerNorm trained
    return [("model.norm.kind", kind), ("model.init", "xavier"), ("optim.lr", 1e-3),
            ("optim.warmup_steps", max(1, scale.steps // 10))]


def saturation(run_dir):
    """The DyT norms' saturated share (|alpha x| > 2) over training: [(step, mean over the
    blocks' norms)] at each logged step that has it."""
    out = []
    for record in read_metrics(run_dir):
        values = [v for k, v in record.items() if k.startswith(f"{ACT}/block_") and
                  k.endswith("_norm_saturation") and v is not None]
        if values:
            out.append((record["step"], float(np.mean(values))))
    return out


def measure_dyt(scale, out):
    """{"losses": {width: {depth: {"layernorm" | alpha0: [final val loss per seed, inf if
    diverged]}}}, "saturation": the same tree of each DyT run's last logged saturation, "curves":
    per width and depth, {alpha0: the mean saturation over training}, "run_dirs", "unigram", and
    the study's completeness}."""
    losses, final_sat, curves, dirs = {}, {}, {}, []
    for width in scale.dyt_widths:
        for depth in scale.dyt_depths:
            sized = dyt_scale(scale, width, depth)
            name = f"d_model={width},n_layer={depth}"
            ln = run_group(train_cfgs(sized, out, f"dyt/{name}", _overrides(sized, "layernorm")),
                           resume=True)
            groups = [train_cfgs(sized, out, f"dyt/{name}", [
                *_overrides(sized, "dyt"), *((k, a) for k in ALPHA_KEYS)]) for a in ALPHAS]
            dyt = run_group([c for g in groups for c in g], resume=True)
            by_alpha = {a: dyt[i * scale.seeds:(i + 1) * scale.seeds]
                        for i, a in enumerate(ALPHAS)}
            cell = losses.setdefault(width, {}).setdefault(depth, {"layernorm": final_losses(ln)})
            for a, runs in by_alpha.items():
                cell[a] = final_losses(runs)
                series = [saturation(r.run_dir) for r in runs]
                final_sat.setdefault(width, {}).setdefault(depth, {})[a] = [
                    s[-1][1] if s else math.nan for s in series]
                curves.setdefault(f"{width}x{depth}", {})[a] = [
                    (step, float(np.mean([dict(s).get(step, math.nan) for s in series])))
                    for step, _ in (series[0] if series else [])]
            dirs += [r.run_dir for r in (*ln, *dyt)]
    return {"losses": losses, "saturation": final_sat, "curves": curves, "run_dirs": dirs,
            "unigram": data_lib.load_corpus("", 0, 1).unigram_entropy(), **completeness(dirs)}
