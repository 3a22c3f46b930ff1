"""Claim 8's study (Wortsman et al. 2023): the shipped learning-rate sweep
(`configs/sweeps/lr_sensitivity.yaml`) run at a `studies.Scale`, and the numbers its judges in
`normexp.lr_verdicts` read, from that sweep or any other over the same keys.
"""

import math
import os

import numpy as np

from normexp import analysis
from normexp import sweep as sweep_lib
from normexp.completeness import completeness
from normexp.metric_names import ATTN, LOSS, block_metric, family
from normexp.rundir import read_metrics

LR_SWEEP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                        "sweeps", "lr_sensitivity.yaml")
SETUP = ("model.placement", "model.d_model", "model.qk_norm")


def lr_sensitivity_sweep(scale, out):
    """The shipped sweep file at this scale, its runs under `<out>/lr_sensitivity`."""
    return sweep_lib.load(LR_SWEEP, os.path.join(out, "lr_sensitivity"),
                          settings=(("seeds", scale.seeds), *scale.lr_sweep))


def measure_lr_sensitivity(scale, out):
    """Run the sweep (in `scale.sweep_workers` processes, one core each: see
    `workers.worker_cores`) and read it."""
    sweep = lr_sensitivity_sweep(scale, out)
    if sweep_lib.run(sweep, max_parallel=scale.sweep_workers, progress=False) > 128:
        raise KeyboardInterrupt  # a stop request: the claims stop too (the runs resume)
    found = completeness(sweep.out_dir)
    if found["missing"] or not found["of"]:  # part of the lrs or seeds: another number
        return {"sensitivity": {}, "runs": {}, "table": [], **found}
    return {**lr_sensitivity_numbers(sweep.out_dir), **found}


def lr_sensitivity_numbers(path):
    """Claim 8's numbers from any finished sweep over SETUP x optim.lr x run.seed: per
    placement, each seed's LR sensitivity per width and qk_norm, and each run's train loss and
    max attention logit (max over blocks) at the logged steps, for the judge of logit growth.
    Returns {"sensitivity": {placement: {width: {qk_norm: {seed: value}}}}, "runs": {placement:
    [run]}, "table": the seed-averaged `analysis.lr_sensitivity` rows}."""
    runs = analysis.load_runs(path)
    sensitivity, trajectories = {}, {}
    per_seed = analysis.lr_sensitivity(runs, by=[*SETUP, "run.seed"])
    for placement, width, qk, seed, value in per_seed[
            [*SETUP, "run.seed", "lr_sensitivity"]].itertuples(index=False):
        sensitivity.setdefault(placement, {}).setdefault(int(width), {}).setdefault(
            qk, {})[int(seed)] = value
    clipped, diverged = analysis.clipped_losses(runs)
    logit_max = [block_metric(family(ATTN, "logit_max"), i)
                 for i in range(int(runs["model.n_layer"].iloc[0]))]
    value = lambda v: math.nan if v is None else float(v)  # None: not finite when logged
    for name, run in runs.iterrows():
        records = [r for r in read_metrics(run["run_dir"]) if LOSS in r]
        trajectories.setdefault(run["model.placement"], []).append({
            "width": int(run["model.d_model"]), "qk_norm": run["model.qk_norm"],
            "lr": float(run["optim.lr"]), "seed": int(run["run.seed"]),
            "loss": float(clipped[name]), "diverged": bool(diverged[name]),
            "steps": [r["step"] for r in records],
            "train_loss": [value(r[LOSS]) for r in records],
            "logit_max": [float(np.fmax.reduce([value(r.get(k)) for k in logit_max]))
                          for r in records]})
    return {"sensitivity": sensitivity, "runs": trajectories, "table": analysis.lr_sensitivity(
        runs, by=list(SETUP)).to_dict(orient="records")}
