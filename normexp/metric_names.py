"""What a run logs and when: the names of its metrics and the one cadence rule.

JAX-free, so that whatever reads runs (results, report, the studies, a notebook) names a metric
as the train step does without importing the model. README's "Reading the gradient norms" lists
every name with its meaning; normexp.metrics computes them.

A per-block family such as `grad_norm/block/attn` holds one value per block: the step emits it
as an [L] vector under the family's name, and it is written per block as
`grad_norm/block_03/attn` (`block_metric`); `parse_metric` reads the family and block back.
"""

import re

LOSS = "loss"  # the training cross entropy of the step's batch (z-loss not included)
VAL_LOSS = "val_loss"  # of the state before the step; the last line's, after the last step
LR = "lr"  # the learning rate the step used
GRAD_NORM = "grad_norm"  # of every gradient, before clipping; with a layer: of that layer's
Z_LOSS = "z_loss"  # the term optim.z_loss adds to the loss
PARAM_NORM = "param_norm"  # with a layer: of that layer's parameters as the model uses them
UPDATE_RATIO = "update_ratio"  # ||update|| / ||parameters||, with a layer: of that layer's
GRAD_RMS = "grad_rms"  # the gradient's RMS over every entry (log.attention)
ACT = "act"  # the residual stream, its updates, norms' and linears' outputs (log.activations)
ATTN = "attn"  # attention's logits, entropy and weights, per block (log.attention)
LOGITS = "logits"  # the output logits: logits/lse_mean, logits/max (log.attention)
ADAM = "adam"  # AdamW's moments and the gradient's outliers, per block (log.activations)

BLOCK = "block"
_PER_BLOCK = re.compile(r"^(?P<prefix>.*)/block_(?P<index>\d+)(?P<part>/.*)?$")


def family(kind, part=None):
    """The name of a per-block family: family('grad_norm', 'attn') = 'grad_norm/block/attn'."""
    return f"{kind}/{BLOCK}" + (f"/{part}" if part else "")


def block_metric(name, index):
    """A family's name for one block: ('grad_norm/block/attn', 3) -> 'grad_norm/block_03/attn'."""
    return name.replace(f"/{BLOCK}", f"/{BLOCK}_{index:02d}", 1)


def parse_metric(name):
    """(family, block index) of a metric name; (name, None) for one that is not per block."""
    match = _PER_BLOCK.match(name)
    if match is None:
        return name, None
    return f"{match['prefix']}/{BLOCK}{match['part'] or ''}", int(match["index"])


def due(step, every, last):
    """The one cadence rule: at multiples of `every` and at `last`. Metrics are logged at steps
    due(s, log.every, train.steps - 1) (inside the jitted step, which computes the statistics
    that are only logged there and then), evaluations and checkpoints of the state after t
    steps at due(t, ..., train.steps). Works on Python ints and on traced ones alike."""
    return (step % every == 0) | (step == last)
