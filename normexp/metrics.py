"""The statistics a run logs, computed inside the jitted train step.

- Per layer: gradient norms `grad_norm/block_03` (the whole block), `grad_norm/block_03/attn`,
  `.../mlp`, `.../norm`, `grad_norm/tok_embed`, `grad_norm/pos_embed`, `grad_norm/final_norm`;
  `param_norm/<layer>` and `update_ratio/<layer>` (||update|| / ||param||).
- Per block, from what the model records (`activation_stats`): the residual stream's `mean`,
  `rms` and `kurtosis`, and `<sublayer>_<input|output>_norm_rms`, the RMS of each sublayer
  norm's output, under `act/block_03/...`.

Inside the step a per-block statistic is one [L] vector under its family name
(`grad_norm/block/attn`); `per_block` names the blocks on the host (normexp.rundir's scheme).
"""

import jax
import jax.numpy as jnp
import numpy as np

from normexp.rundir import BLOCK, block_metric


def param_group(path):
    """(layer, part) of a parameter path: the names per-layer gradient norms are logged under.

    Block parameters give ("block", "attn" | "mlp" | "norm") and carry the stacked [L] axis
    ("norm": the norms and gates a placement puts around the sublayers; norms inside attention
    or the MLP count with their sublayer);
    the rest give their module's name ('tok_embed', 'pos_embed', 'final_norm') and no part.
    """
    if path[0] == "blocks":
        part = "norm" if "norms" in path[1] else path[1]
        return BLOCK, part
    return path[0], None


def path_names(keypath):
    """('blocks', 3, 'attn', 'qkv', 'kernel') from a jax key path (dropping Variable's .value)."""
    names = []
    for key in keypath:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(key.key)
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(key.idx)
    return tuple(names)


def group_sums_of_squares(tree):
    """Sum of squared entries per layer and per (layer/part), in float32.

    Block parameters are stacked on a leading [L] axis: they are reduced over every other axis,
    so 'block' and 'block/attn' hold one value per block rather than one for all blocks.
    """
    sums = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        layer, part = param_group(path_names(keypath))
        axes = tuple(range(1, leaf.ndim)) if layer == BLOCK else None
        square_sum = jnp.sum(jnp.square(leaf.astype(jnp.float32)), axis=axes)
        for name in (layer, f"{layer}/{part}" if part else None):
            if name is not None:
                sums[name] = sums.get(name, 0.0) + square_sum
    return sums


def layer_stats(params, grads, updates):
    """Gradient norm per layer and part, parameter norm and update/parameter ratio per layer.

    Per-block values come out as [L] vectors under 'block'; `per_block` names them.
    """
    g2 = group_sums_of_squares(grads)
    p2 = group_sums_of_squares(params)
    u2 = group_sums_of_squares(updates)
    stats = {f"grad_norm/{name}": jnp.sqrt(v) for name, v in g2.items()}
    layers = [name for name in p2 if "/" not in name]
    for layer in layers:
        stats[f"param_norm/{layer}"] = jnp.sqrt(p2[layer])
        stats[f"update_ratio/{layer}"] = jnp.sqrt(u2[layer] / p2[layer])
    param_total = sum(jnp.sum(p2[layer]) for layer in layers)
    stats["param_norm"] = jnp.sqrt(param_total)
    stats["update_ratio"] = jnp.sqrt(sum(jnp.sum(u2[layer]) for layer in layers) / param_total)
    return stats


def stream_stats(x_NxC):
    """Mean, RMS and excess kurtosis E[(x - mean)^4] / var^2 - 3 of all entries, in float32."""
    x = jax.lax.stop_gradient(x_NxC).astype(jnp.float32)
    mean = x.mean()
    var = jnp.mean(jnp.square(x - mean))
    kurtosis = jnp.mean(jnp.square(jnp.square(x - mean))) / jnp.square(var) - 3.0
    return {"mean": mean, "rms": jnp.sqrt(jnp.mean(jnp.square(x))), "kurtosis": kurtosis}


def rms(x):
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def block_stats(seen):
    """One block's activation statistics from what it recorded (see `model.Block`): the
    stream's, and the RMS of each sublayer norm's output."""
    stats = stream_stats(seen["stream"])
    stats.update({f"{name}_rms": rms(x) for name, x in seen.items() if name != "stream"})
    return stats


def activation_stats(record):
    """The `observe` function a model is called with: `block_stats` where `record` (a traced
    bool: a log step) is true, zeros of the same shapes elsewhere, so the statistics cost
    nothing at the steps that are not logged."""
    def observe(seen):
        skip = lambda seen: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                         jax.eval_shape(block_stats, seen))
        return jax.lax.cond(record, block_stats, skip, seen)
    return observe


def per_block(metrics):
    """Host side: 'grad_norm/block/attn' = [L] values -> 'grad_norm/block_00/attn', ... ."""
    out = {}
    for key, value in metrics.items():
        value = np.asarray(value)
        if value.ndim == 1:
            for i, v in enumerate(value):
                out[block_metric(key, i)] = float(v)
        else:
            out[key] = float(value)
    return out
