"""The depth study behind claims 9 and 10: Pre-LN, LayerNorm Scaling, Mix-LN and Post-LN, each
trained at one depth over the same seeds, then every seed's trained run pruned block by block
(`normexp.prune`): its output variance, the damage of skipping each block, and the angular
distance across each block.

Sun et al. 2025 (the Curse of Depth, arXiv 2502.05795) train LLaMA-style models (130M-1B,
RMSNorm, SwiGLU) for 1k-10k+ steps and turn the scaled residual init off with LNS; Li et al.
2024 (Mix-LN, arXiv 2412.13795) the same family from 71M up. Here: byte-level models of
`Scale.depth_layers` blocks (`depth_scale`) on the embedded corpus, LayerNorm and GELU, GPT-2's
N(0, 0.02) init without the residual scaling in every arm, a final norm where the stream ends
unnormalized (not under Post-LN), Mix-LN's alpha 0.25 (its paper's best at 71M-1B, Table 5).
"""

import dataclasses
import math

from normexp import data as data_lib
from normexp.completeness import completeness, final_losses
from normexp.prune import prune
from normexp.studies import train_seeds

PLACEMENTS = ("pre", "lns", "mix", "post")
PROFILES = ("var", "damage", "angular")


def depth_scale(scale):
    """The study's size: `depth_layers` blocks at half the batch of the other studies (twice
    their 6 blocks at --quick would otherwise cost twice the time)."""
    return dataclasses.replace(scale, n_layer=scale.depth_layers,
                               batch_size=max(1, scale.batch_size // 2))


def depth_overrides(scale, placement):
    return [("model.placement", placement),
            ("model.final_norm", placement != "post"), ("model.scale_residual_init", False),
            ("model.mix_alpha", 0.25), ("optim.lr", 1e-3),
            ("optim.warmup_steps", max(1, scale.steps // 10))]


def measure_depth(scale, out, pruned=PLACEMENTS):
    """Trains (or reuses) the whole study; returns {"profiles": {placement in `pruned`: {"var"
    | "damage" | "angular": [per seed: [per block], or None for a seed that diverged]}},
    "losses": {placement: final_losses}, "unigram", and the study's completeness}."""
    runs = {p: train_seeds(depth_scale(scale), out, "depth", depth_overrides(scale, p))
            for p in PLACEMENTS}
    found = completeness([r.run_dir for group in runs.values() for r in group])
    numbers = {"losses": {p: final_losses(group) for p, group in runs.items()},
               "unigram": data_lib.load_corpus("", 0, 1).unigram_entropy(), **found}
    if found["missing"]:  # a run's last checkpoint is not its trained model
        return {**numbers, "profiles": {}}
    profiles = {p: {k: [] for k in PROFILES} for p in pruned}
    for p in pruned:
        for loss, summary in zip(numbers["losses"][p], runs[p]):
            measured = prune(summary.run_dir) if math.isfinite(loss) else {}
            for k in PROFILES:
                profiles[p][k].append(measured.get(k))
    return {**numbers, "profiles": profiles}
