"""Per-layer gradient, parameter and update norms, computed inside the jitted train step.

Names follow one scheme: `grad_norm/block_03` (the whole block), `grad_norm/block_03/attn`,
`.../mlp`, `.../norm`, `grad_norm/tok_embed`, `grad_norm/pos_embed`, `grad_norm/final_norm`,
`param_norm/<layer>` and `update_ratio/<layer>` (||update|| / ||param||).
"""

import jax
import jax.numpy as jnp

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
    """Sum of squared entries per layer and per (layer/part), in float32."""
    sums = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        square_sum = jnp.sum(jnp.square(leaf.astype(jnp.float32)))
        layer, part = param_group(path_names(keypath))
        for name in (layer, f"{layer}/{part}" if part else None):
            if name is not None:
                sums[name] = sums.get(name, 0.0) + square_sum
    return sums


def layer_stats(params, grads, updates):
    """Gradient norm per layer and part, parameter norm and update/parameter ratio per layer."""
    g2 = group_sums_of_squares(grads)
    p2 = group_sums_of_squares(params)
    u2 = group_sums_of_squares(updates)
    stats = {f"grad_norm/{name}": jnp.sqrt(v) for name, v in g2.items()}
    layers = [name for name in p2 if "/" not in name]
    for layer in layers:
        stats[f"param_norm/{layer}"] = jnp.sqrt(p2[layer])
        stats[f"update_ratio/{layer}"] = jnp.sqrt(u2[layer] / p2[layer])
    param_total = sum(p2[layer] for layer in layers)
    stats["param_norm"] = jnp.sqrt(param_total)
    stats["update_ratio"] = jnp.sqrt(sum(u2[layer] for layer in layers) / param_total)
    return stats
