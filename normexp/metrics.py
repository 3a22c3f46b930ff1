"""The statistics a run logs, computed inside the jitted train step.

- Per layer: gradient norms `grad_norm/block_03` (the whole block), `grad_norm/block_03/attn`,
  `.../mlp`, `.../norm`, `grad_norm/tok_embed`, `grad_norm/pos_embed`, `grad_norm/final_norm`;
  `param_norm/<layer>` and `update_ratio/<layer>` (||update|| / ||param||).
- Per block, from what the model records (`block_observer`), under `act/block_03/...`
  (`log.activations`): the residual stream's `mean`, `var`, `rms` and `kurtosis`; each
  sublayer's residual update ratio `<attn|mlp>_update_ratio`; `<sublayer>_<input|output>_norm_rms`,
  the RMS of each sublayer norm's output; `<q|k|v|proj|up|down>_rms`, each linear layer's
  output RMS; for DyT and Derf norms `<norm>_saturation` and `<norm>_alpha`.
- The instability diagnostics (`log.attention`): `attn/block_03/...` (`attention_stats`),
  `act/block_03/massive`, `logits/lse_mean` and `logits/max`, `grad_rms/block_03` and
  `grad_rms`.

- For the gradient studies, outside the step: `gradient_expectation`, ||E[g]|| and E[||g||]
  over k batches per parameter and block.

Inside the step a per-block statistic is one [L] vector under its family name
(`grad_norm/block/attn`); `per_block` names the blocks on the host (normexp.rundir's scheme).
"""

import jax
import jax.numpy as jnp
import numpy as np

from normexp.metric_names import ACT, ATTN, BLOCK, GRAD_NORM, PARAM_NORM, UPDATE_RATIO, block_metric
from normexp.optim import adam_moments
from normexp.weights import effective


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
    """Gradient norm per layer and part, parameter norm and update/parameter ratio per layer
    (of the parameters as the model uses them: unit-offset gains with their offset).

    Per-block values come out as [L] vectors under 'block'; `per_block` names them.
    """
    g2 = group_sums_of_squares(grads)
    p2 = group_sums_of_squares(effective(params))
    u2 = group_sums_of_squares(updates)
    stats = {f"{GRAD_NORM}/{name}": jnp.sqrt(v) for name, v in g2.items()}
    layers = [name for name in p2 if "/" not in name]
    for layer in layers:
        stats[f"{PARAM_NORM}/{layer}"] = jnp.sqrt(p2[layer])
        stats[f"{UPDATE_RATIO}/{layer}"] = jnp.sqrt(u2[layer] / p2[layer])
    param_total = sum(jnp.sum(p2[layer]) for layer in layers)
    stats[PARAM_NORM] = jnp.sqrt(param_total)
    stats[UPDATE_RATIO] = jnp.sqrt(sum(jnp.sum(u2[layer]) for layer in layers) / param_total)
    return stats


def stream_stats(x_NxC):
    """Mean, variance E[(x - mean)^2], RMS and excess kurtosis E[(x - mean)^4] / var^2 - 3 of
    all entries, in float32."""
    x = jax.lax.stop_gradient(x_NxC).astype(jnp.float32)
    mean = x.mean()
    var = jnp.mean(jnp.square(x - mean))
    kurtosis = jnp.mean(jnp.square(jnp.square(x - mean))) / jnp.square(var) - 3.0
    return {"mean": mean, "var": var, "rms": jnp.sqrt(jnp.mean(jnp.square(x))),
            "kurtosis": kurtosis}


def rms(x):
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def update_ratio(before_NxC, after_NxC):
    """||after - before||_F / ||before||_F: how much a sublayer's rule changed the residual
    stream. Under Pre-Norm x + F(N(x)) it is ||F(N(x))|| / ||x||, the residual update ratio of
    the Curse of Depth (Sun et al. 2025) and Peri-LN (Kim et al. 2025); under Post-Norm the
    change includes the renormalization N(x + F(x)) - x."""
    before = jax.lax.stop_gradient(before_NxC).astype(jnp.float32)
    after = jax.lax.stop_gradient(after_NxC).astype(jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(after - before)) / jnp.sum(jnp.square(before)))


def angular_distance(a_NxC, b_NxC):
    """The angle between each token's two vectors over pi, averaged over tokens: 0 same
    direction, 1/2 orthogonal (Gromov et al. 2024; Li et al. 2024, Fig. 3, between the inputs
    of consecutive blocks). As 2 atan2(|u - v|, |u + v|) of the unit vectors: exact near 0,
    where arccos of a float32 cosine is not."""
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    u, v = (unit(jax.lax.stop_gradient(x).astype(jnp.float32)) for x in (a_NxC, b_NxC))
    angle = 2 * jnp.arctan2(jnp.linalg.norm(u - v, axis=-1), jnp.linalg.norm(u + v, axis=-1))
    return jnp.mean(angle) / jnp.pi


def saturation(squash):
    """The share of a DyT or Derf norm's inputs where the squashing function saturates:
    |alpha x + s| > 2 (tanh(2) = 0.96, erf(2) = 0.995)."""
    z = squash["alpha"] * jax.lax.stop_gradient(squash["x"]).astype(jnp.float32) + squash["shift"]
    return jnp.mean((jnp.abs(z) > 2.0).astype(jnp.float32))


def block_stats(seen):
    """One block's activation statistics from what it recorded (see `model.Block`): the
    output stream's (`stream_stats`); `attn_update_ratio` and `mlp_update_ratio`
    (`update_ratio` of the stream across each sublayer's rule); the RMS of each sublayer
    norm's output (`attn_input_norm_rms`, ...) and of each linear layer's (`q_rms`, `k_rms`,
    `v_rms`, `proj_rms`, `up_rms`, `down_rms`: Rybakov et al. 2024); for DyT and Derf norms
    their `saturation` and learned `alpha` (`attn_input_norm_saturation`, ...)."""
    stats = stream_stats(seen["stream"])
    stats["attn_update_ratio"] = update_ratio(seen["attn_in"], seen["mlp_in"])
    stats["mlp_update_ratio"] = update_ratio(seen["mlp_in"], seen["stream"])
    stats.update({f"{name}_rms": rms(x) for name, x in seen.items() if name.endswith("_norm")})
    stats.update({f"{name}_rms": rms(x) for name, x in seen["linear"].items()})
    for name, squash in seen.items():
        if name.endswith("_squash"):
            norm = name.removesuffix("_squash")
            stats[f"{norm}_saturation"] = saturation(squash)
            stats[f"{norm}_alpha"] = squash["alpha"].astype(jnp.float32)
    return stats


def attention_stats(q_BxTxHxK, k_BxTxHxK):
    """What the attention of one block does, recomputed from its queries and keys (after any
    QK-norm, before the 1/sqrt(K) scale), so it is the same whatever kernel ran:

    - `logit_max`: the largest pre-softmax logit q.k / sqrt(K) over heads and (causal)
      positions, and `logit_max_head` per head: growing logits precede divergence (Dehghani et
      al. 2023; Wortsman et al. 2023);
    - `entropy`: the attention distributions' entropy in nats, averaged over batch, heads and
      all T query positions; `entropy_min` the same mean of the most collapsed head (entropy
      collapse, Zhai et al. 2023). Under the causal mask query i (0-based) attends to i + 1
      keys, so its entropy is at most ln(i + 1) (query 0's is always 0), and uniform causal
      attention gives mean_i ln(i + 1) = ln(T!) / T (about ln T - 1), not ln T;
    - `q_norm`, `k_norm`: mean per-head query and key L2 norms (logits grow through them);
    - `sink`: the attention mass on key 0, averaged over batch, heads and all T query
      positions, query 0 included: its only key is key 0, so its term is always 1 and `sink`
      is at least 1/T; uniform causal attention gives mean_i 1 / (i + 1) (attention sinks,
      Xiao et al. 2024).
    """
    q = jax.lax.stop_gradient(q_BxTxHxK).astype(jnp.float32)
    k = jax.lax.stop_gradient(k_BxTxHxK).astype(jnp.float32)
    T, K = q.shape[1], q.shape[3]
    causal_TxT = np.tril(np.ones((T, T), bool))
    logits_BxHxTxT = jnp.einsum("bthk,bshk->bhts", q, k) / np.float32(np.sqrt(K))
    masked = jnp.where(causal_TxT, logits_BxHxTxT, -jnp.inf)
    logp = jax.nn.log_softmax(masked, axis=-1)
    p = jnp.exp(logp)
    entropy_BxHxT = -jnp.sum(jnp.where(causal_TxT, p * logp, 0.0), axis=-1)
    head_max_H = masked.max(axis=(0, 2, 3))
    return {"logit_max": head_max_H.max(), "logit_max_head": head_max_H,
            "entropy": entropy_BxHxT.mean(), "entropy_min": entropy_BxHxT.mean((0, 2)).min(),
            "q_norm": jnp.linalg.norm(q, axis=-1).mean(),
            "k_norm": jnp.linalg.norm(k, axis=-1).mean(), "sink": p[..., 0].mean()}


def massive(x_NxC):
    """max |x| / median |x| over every entry: massive activations (Sun et al. 2024) are a few
    entries thousands of times the typical one."""
    a = jnp.abs(jax.lax.stop_gradient(x_NxC).astype(jnp.float32)).ravel()
    return a.max() / median_nonneg(a)


def median_nonneg(a):
    """The median of non-negative float32 values, exactly (as np.median: the mean of the two
    middle values of an even count), without a sort: jnp.median sorts, ~200 ms for the 0.5M
    entries of the default model's stream on CPU; this takes 32 counting passes (~10 ms)."""
    n = a.size
    bits = jax.lax.bitcast_convert_type(a, jnp.int32).ravel()  # ordered as the values (a >= 0)
    k_2 = jnp.asarray([(n - 1) // 2, n // 2], jnp.int32)  # the middle one(s), 0-based

    def halve(_, bounds):  # keep [lo, hi] around the smallest v with count(bits <= v) > k
        lo_2, hi_2 = bounds
        mid_2 = lo_2 + (hi_2 - lo_2) // 2
        enough_2 = jnp.sum(bits[None, :] <= mid_2[:, None], axis=1) > k_2
        return jnp.where(enough_2, lo_2, mid_2 + 1), jnp.where(enough_2, mid_2, hi_2)

    start = (jnp.zeros(2, jnp.int32), jnp.full(2, 0x7F800000, jnp.int32))  # [0, inf]
    lo_2, _ = jax.lax.fori_loop(0, 32, halve, start)
    return jax.lax.bitcast_convert_type(lo_2, jnp.float32).mean()


def output_logit_stats(logits_NxV):
    """`lse_mean`, the mean log Z = logsumexp of the output logits (what z-loss holds near 0;
    its drift is output-logit divergence), and `max`, the largest logit."""
    logits = jax.lax.stop_gradient(logits_NxV).astype(jnp.float32)
    return {"lse_mean": jax.nn.logsumexp(logits, axis=-1).mean(), "max": logits.max()}


def block_entries(tree):
    """How many entries each block has in `tree`'s block leaves (a Python int)."""
    return sum(leaf.size // leaf.shape[0] for path, leaf in
               jax.tree_util.tree_flatten_with_path(tree)[0]
               if param_group(path_names(path))[0] == BLOCK)


def block_sums(tree):
    """The sum of the entries of every block parameter's leaf, per block ([L]), in float32."""
    total = 0.0
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if param_group(path_names(keypath))[0] == BLOCK:
            total = total + jnp.sum(leaf.astype(jnp.float32), axis=tuple(range(1, leaf.ndim)))
    return total


ADAM_OUTLIER_K = 6.0


def adam_stats(grads, before, after):
    """What AdamW holds per block ([L]), from the optimizer states `before` and `after` the
    step (OLMo-core logs these to trace spikes to layers): `m_rms`, the RMS of the first
    moment m after the step; `v_sqrt_rms`, the RMS of sqrt(v) (sqrt of the mean v); and
    `outliers`, the share of the block's gradient entries (the raw gradient, before clipping)
    with |g| > 6 sqrt(v_hat), v_hat = v / (1 - b2^t) the bias-corrected second moment of the
    t steps before this one (0 at the first step, which has no history)."""
    mu, nu, _, _ = adam_moments(after)
    _, nu_before, t, b2 = adam_moments(before)
    entries = block_entries(grads)
    correction = 1.0 - jnp.power(b2.astype(jnp.float32), t.astype(jnp.float32))
    outside = jax.tree.map(
        lambda g, v: jnp.abs(g.astype(jnp.float32)) > ADAM_OUTLIER_K * jnp.sqrt(
            v.astype(jnp.float32) / jnp.maximum(correction, 1e-30)), grads, nu_before)
    return {"m_rms": jnp.sqrt(group_sums_of_squares(mu)[BLOCK] / entries),
            "v_sqrt_rms": jnp.sqrt(block_sums(nu) / entries),
            "outliers": jnp.where(t > 0, block_sums(outside) / entries, 0.0)}


def grad_rms(grads):
    """RMS of the gradient entries of each block ([L]) and of all of them (embeddings and
    final norm included): where it nears AdamW's eps, the update stops following the
    gradient's scale. The train step passes the raw gradient of the loss it minimises (z-loss
    included), before `optim.clip_norm` clips it (the clipping is inside the optimizer)."""
    sums = group_sums_of_squares(grads)
    layers = [name for name in sums if "/" not in name]
    total = sum(jnp.sum(sums[layer]) for layer in layers)
    return {BLOCK: jnp.sqrt(sums[BLOCK] / block_entries(grads)),
            "all": jnp.sqrt(total / sum(leaf.size for leaf in jax.tree.leaves(grads)))}


def gradient_expectation(grads_per_batch):
    """From the gradients of k batches (an iterable of parameter trees): per parameter path
    ('blocks/mlp/down/kernel'), `expected`, the norm of the mean gradient ||E[g]||_F (what
    Xiong et al. 2020 plot), and `per_batch`, the mean of the per-batch norms E[||g||_F];
    blocks' parameters per block ([L] vectors), the others scalars. float64 on the host."""
    total, norms, k = {}, {}, 0
    for grads in grads_per_batch:
        k += 1
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
            names = path_names(keypath)
            g = np.asarray(jax.device_get(leaf), np.float64)
            g = g.reshape(len(g), -1) if names[0] == "blocks" else g.reshape(1, -1)
            key = "/".join(map(str, names))
            total[key] = total.get(key, 0.0) + g
            norms[key] = norms.get(key, 0.0) + np.linalg.norm(g, axis=1)
    squeeze = lambda key, v: v if key.startswith("blocks/") else float(v[0])
    return {key: {"expected": squeeze(key, np.linalg.norm(total[key] / k, axis=1)),
                  "per_batch": squeeze(key, norms[key] / k)} for key in total}


def when(record, fn, *args):
    """fn(*args) where `record` (a traced bool: a log step) is true, zeros of its shapes
    elsewhere: statistics that cost nothing at the steps that are not logged."""
    skip = lambda *args: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                      jax.eval_shape(fn, *args))
    return jax.lax.cond(record, fn, skip, *args)


ATTENTION_ONLY = ("attn_q", "attn_k")  # what a block records for `attention_stats` alone


def block_observer(record, *, activations=True, attention=False):
    """The `observe` function a model is called with: per block, {"act": ...} (with
    `activations`: `block_stats`; with `attention`: also `massive`) and {"attn": ...}
    (`attention_stats`), where `record` (a traced bool: a log step) is true, zeros of the same
    shapes elsewhere, so the statistics cost nothing at the steps that are not logged."""
    def stats(seen):
        out = {}
        if activations:
            out[ACT] = block_stats(seen)
        if attention:
            out.setdefault(ACT, {})["massive"] = massive(seen["stream"])
            out[ATTN] = attention_stats(seen["attn_q"], seen["attn_k"])
        return out

    def observe(seen):
        used = {name: x for name, x in seen.items()
                if (activations and name not in ATTENTION_ONLY) or
                (attention and name in ("stream", *ATTENTION_ONLY))}
        return when(record, stats, used)
    return observe


def per_block(metrics):
    """Host side: 'grad_norm/block/attn' = [L] values -> 'grad_norm/block_00/attn', ... ;
    [L, H] values (per head) -> 'attn/block_00/logit_max_head/00', ... ."""
    out = {}
    for key, value in metrics.items():
        value = np.asarray(value)
        if value.ndim == 2:
            for i, row in enumerate(value):
                for h, v in enumerate(row):
                    out[f"{block_metric(key, i)}/{h:02d}"] = float(v)
        elif value.ndim == 1:
            for i, v in enumerate(value):
                out[block_metric(key, i)] = float(v)
        else:
            out[key] = float(value)
    return out
