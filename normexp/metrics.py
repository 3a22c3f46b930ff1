"""Per-layer gradient, parameter and update norms, computed inside the jitted train step.

Names follow one scheme: `grad_norm/block_03` (the whole block), `grad_norm/block_03/attn`,
`.../mlp`, `.../norm`, `grad_norm/tok_embed`, `grad_norm/pos_embed`, `grad_norm/final_norm`,
`param_norm/<layer>` and `update_ratio/<layer>` (||update|| / ||param||).
"""

import jax
import jax.numpy as jnp
import numpy as np

from normexp.model import param_group


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
        axes = tuple(range(1, leaf.ndim)) if layer == "block" else None
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


def per_block(metrics):
    """Host side: 'grad_norm/block/attn' = [L] values -> 'grad_norm/block_00/attn', ... ."""
    out = {}
    for key, value in metrics.items():
        value = np.asarray(value)
        if value.ndim == 1:
            for i, v in enumerate(value):
                out[key.replace("/block", f"/block_{i:02d}", 1)] = float(v)
        else:
            out[key] = float(value)
    return out
