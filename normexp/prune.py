"""Layer pruning (`normexp prune RUN`): how much each block of a trained run matters, measured
from its last verified checkpoint on its own validation batches (those its val loss uses).

Per block l:
- `damage`: the validation loss with block l skipped (its input passed on unchanged, norms and
  all) minus the whole model's. Near 0, the block can go: Sun et al. 2025 (the Curse of Depth,
  Fig. 4) and Li et al. 2024 (Mix-LN) find deep Pre-LN blocks cheap to drop, after Gromov et
  al. 2024, who drop blocks of trained LLMs;
- `angular`: the angular distance between block l's input and its output (block l+1's input),
  `metrics.angular_distance` (Li et al. 2024, Fig. 3);
- `var`, `attn_update_ratio`, `mlp_update_ratio`: the whole model's output variance and update
  ratios per block (`metrics.block_stats`), on the same batches.
Each is the mean over the batches. `prune` returns them; the command also writes prune.json
into the run's directory.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from normexp import config as config_lib
from normexp import data as data_lib
from normexp import rundir
from normexp.checkpoint import Checkpoints
from normexp.errors import UsageError
from normexp.metrics import angular_distance, block_stats
from normexp.model import evaluation_view
from normexp.step import init_state, loss_fn

PRUNE = "prune.json"
PER_BLOCK = ("damage", "angular", "var", "attn_update_ratio", "mlp_update_ratio")


def _observe(seen):
    stats = block_stats(seen)
    return {"angular": angular_distance(seen["attn_in"], seen["stream"]),
            **{k: stats[k] for k in PER_BLOCK[2:]}}


def prune(run_dir, *, batches=None):
    """The pruning measurements of the run in `run_dir` (see the module): a dict with the
    checkpoint's `step`, the run's `status`, `loss` (nothing skipped), `skipped_loss` and each
    of PER_BLOCK as lists over blocks."""
    if not rundir.is_run(run_dir):
        raise UsageError(f"{run_dir}: not a run directory (it has no {rundir.CONFIG})")
    cfg = config_lib.load(os.path.join(run_dir, rundir.CONFIG))
    where = os.path.join(run_dir, "checkpoints")
    checkpoints = Checkpoints(where, 1) if os.path.isdir(where) else None
    if checkpoints is None or not checkpoints.intact:
        raise UsageError(f"{run_dir}: no verified checkpoint to evaluate in {where}")
    corpus = data_lib.corpus_of(cfg.data)
    graphdef, _, state = init_state(cfg, corpus.vocab_size)
    step = checkpoints.intact[-1]
    state = checkpoints.restore(step, state)  # verified by its checksums
    checkpoints.close()
    val = data_lib.eval_batches(corpus.val, seed=cfg.run.seed,
                                count=batches or cfg.data.eval_batches,
                                batch_size=cfg.train.batch_size, seq_len=cfg.data.seq_len)

    @jax.jit  # one program for every skipped block: `skip` is traced (-1 skips none)
    def evaluate(params, rest, inputs_BxT, targets_BxT, skip):
        model = evaluation_view(nnx.merge(graphdef, params, rest))
        logits, seen = model(inputs_BxT, observe=_observe, skip=skip)
        return loss_fn(logits, targets_BxT), seen

    def mean_over_batches(skip):
        out = [evaluate(state["params"], state["rest"], x, y, jnp.int32(skip)) for x, y in val]
        return jax.tree.map(lambda *v: np.mean(np.stack(v), axis=0).tolist(), *out)

    loss, stats = mean_over_batches(-1)
    skipped = [mean_over_batches(l)[0] for l in range(cfg.model.n_layer)]
    summary = rundir.read_summary(run_dir)
    return {"run": run_dir, "step": int(step), "status": summary and summary.status,
            "batches": len(val), "loss": loss, "skipped_loss": skipped,
            "damage": [s - loss for s in skipped], **stats}


def table(numbers):
    """The per-block measurements as text, one row per block."""
    lines = [f"{numbers['run']}: step {numbers['step']}, {numbers['status']}, val loss "
             f"{numbers['loss']:.4f} over {numbers['batches']} batches",
             "block  " + "  ".join(f"{k:>17}" for k in PER_BLOCK)]
    for l, row in enumerate(zip(*(numbers[k] for k in PER_BLOCK))):
        lines.append(f"{l:5d}  " + "  ".join(f"{v:17.4g}" for v in row))
    return "\n".join(lines)


def write(numbers):
    """prune.json in the run's directory; returns its path."""
    path = os.path.join(numbers["run"], PRUNE)
    rundir.write_atomic(path, json.dumps(numbers, indent=1) + "\n")
    return path
