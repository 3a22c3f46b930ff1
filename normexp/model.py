"""A decoder-only GPT whose norm and placement are config switches (Flax NNX).

Shape letters: B batch, T time (sequence), N = B*T tokens, C model width, H heads, K head
width (C / H), F MLP hidden width, V vocabulary, L blocks. Activations flow as 2-D [N, C] so
every projection is a plain 2-D matmul and weight gradients need no transposing copies on CPU.

The blocks' parameters are stacked on a leading L axis (one `Block` module created with
`nnx.vmap`) and applied with `jax.lax.scan`, so compile time does not grow with depth;
`model.scan: false` applies the same stacked parameters in a Python loop, for debugging.
"""

import functools
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from normexp import custom_grads
from normexp.norms import make_norm
from normexp.placement import PLACEMENTS, Depth

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Up to this depth the scan is unrolled by default: inside an XLA:CPU while loop every saved
# activation is a stacked buffer that is zero-filled and sliced each step (~15% step time at 4
# blocks), while compiling 8 unrolled blocks still takes only ~2 s.
AUTO_UNROLL_MAX = 8
REMAT_POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def linear_options(bias, dtype, custom_grad, rngs):
    options = dict(use_bias=bias, dtype=dtype, rngs=rngs)
    if custom_grad:
        options["dot_general"] = custom_grads.dot_general
    return options


class Attention(nnx.Module):
    """Causal multi-head self-attention on [N, C] activations."""

    def __init__(self, d_model, n_head, *, bias, init_std, out_std, fused, custom_grad, dtype,
                 rngs):
        self.n_head, self.fused = n_head, fused
        self.core = (custom_grads.causal_attention if custom_grad
                     else custom_grads.causal_attention_plain)
        lin = linear_options(bias, dtype, custom_grad, rngs)
        self.qkv = nnx.Linear(d_model, 3 * d_model, kernel_init=nnx.initializers.normal(init_std),
                              **lin)
        self.proj = nnx.Linear(d_model, d_model, kernel_init=nnx.initializers.normal(out_std), **lin)

    def __call__(self, x_NxC, seq_len):
        N, C = x_NxC.shape
        T, H = seq_len, self.n_head
        B, K = N // T, C // H
        qkv_BxTx3xHxK = self.qkv(x_NxC).reshape(B, T, 3, H, K)
        if self.fused:  # the backend's fused kernel (cuDNN flash attention on GPUs)
            q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (qkv_BxTx3xHxK[:, :, i] for i in range(3))
            y_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK,
                                                     is_causal=True)
            return self.proj(y_BxTxHxK.reshape(N, C))
        # Head-major [B, H, T, K] keeps the two attention matmuls batched over (B, H).
        q_BxHxTxK, k_BxHxTxK, v_BxHxTxK = qkv_BxTx3xHxK.transpose(2, 0, 3, 1, 4)
        y_BxHxTxK = self.core(q_BxHxTxK, k_BxHxTxK, v_BxHxTxK)
        return self.proj(y_BxHxTxK.transpose(0, 2, 1, 3).reshape(N, C))


class MLP(nnx.Module):
    """Two-layer perceptron with exact GELU: W2 gelu(W1 x)."""

    def __init__(self, d_model, d_hidden, *, bias, init_std, out_std, custom_grad, dtype, rngs):
        self.gelu = custom_grads.gelu if custom_grad else functools.partial(jax.nn.gelu,
                                                                            approximate=False)
        lin = linear_options(bias, dtype, custom_grad, rngs)
        self.up = nnx.Linear(d_model, d_hidden, kernel_init=nnx.initializers.normal(init_std),
                             **lin)
        self.down = nnx.Linear(d_hidden, d_model, kernel_init=nnx.initializers.normal(out_std),
                               **lin)

    def __call__(self, x_NxC):
        return self.down(self.gelu(self.up(x_NxC)))


class Block(nnx.Module):
    """One transformer block: attention then MLP, each wrapped by the placement rule."""

    def __init__(self, cfg, *, out_std, fused_attention, rngs):
        dtype = DTYPES[cfg.dtype]
        norm = dict(eps=cfg.norm.eps, bias=cfg.norm.bias, custom_grad=cfg.custom_grads, rngs=rngs)
        lin = dict(bias=cfg.bias, init_std=cfg.init_std, out_std=out_std, dtype=dtype,
                   custom_grad=cfg.custom_grads, rngs=rngs)
        self.placement = PLACEMENTS[cfg.placement]
        self.attn_norm = make_norm(cfg.norm.kind, cfg.d_model, **norm)
        self.attn = Attention(cfg.d_model, cfg.n_head, fused=fused_attention, **lin)
        self.mlp_norm = make_norm(cfg.norm.kind, cfg.d_model, **norm)
        self.mlp = MLP(cfg.d_model, cfg.mlp_ratio * cfg.d_model, **lin)

    def __call__(self, x_NxC, seq_len, depth):
        attn = lambda h: self.attn(h, seq_len)
        x_NxC = self.placement(x_NxC, attn, self.attn_norm, depth)
        return self.placement(x_NxC, self.mlp, self.mlp_norm, depth)


def fused_attention_for(setting, platform):
    """`model.attention`: auto = the fused kernel on accelerators, the einsum core on CPU."""
    if setting == "auto":
        return platform != "cpu"
    return setting == "dot_product"


class GPT(nnx.Module):
    """Token + learned position embeddings, n_layer blocks, optional final norm, tied head."""

    def __init__(self, cfg, *, vocab_size, max_len, remat=None, rngs):
        std, L = cfg.init_std, cfg.n_layer
        out_std = std / math.sqrt(2 * L) if cfg.scale_residual_init else std
        self.dtype = DTYPES[cfg.dtype]
        self.scan, self.remat, self.n_layer = cfg.scan, remat, L
        # remat only saves memory between the iterations of a real loop
        shallow = L <= AUTO_UNROLL_MAX and remat is None
        self.unroll = cfg.scan_unroll or (L if shallow else 1)
        fused = fused_attention_for(cfg.attention, jax.default_backend())
        self.tok_embed = nnx.Embed(vocab_size, cfg.d_model, dtype=self.dtype, rngs=rngs,
                                   embedding_init=nnx.initializers.normal(std))
        self.pos_embed = nnx.Param(std * jax.random.normal(rngs.params(), (max_len, cfg.d_model)))

        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_blocks(rngs):
            return Block(cfg, out_std=out_std, fused_attention=fused, rngs=rngs)

        self.blocks = stacked_blocks(rngs)  # every parameter has a leading [L] axis
        self.final_norm = (make_norm(cfg.norm.kind, cfg.d_model, eps=cfg.norm.eps,
                                     bias=cfg.norm.bias, custom_grad=cfg.custom_grads, rngs=rngs)
                           if cfg.final_norm else None)

    def features(self, tokens_BxT):
        """The residual stream after the last block (and final norm), as [N, C]."""
        B, T = tokens_BxT.shape
        x_BxTxC = self.tok_embed(tokens_BxT) + self.pos_embed[:T].astype(self.dtype)
        x_NxC = self._apply_blocks(x_BxTxC.reshape(B * T, -1), T)
        if self.final_norm is not None:
            x_NxC = self.final_norm(x_NxC)
        return x_NxC

    def _apply_blocks(self, x_NxC, seq_len):
        graphdef, params, rest = nnx.split(self.blocks, nnx.Param, ...)
        L = self.n_layer

        def one_block(x_NxC, params, rest, index):
            block = nnx.merge(graphdef, params, rest)
            x_NxC = block(x_NxC, seq_len, Depth(index, L))
            return x_NxC, nnx.state(block, nnx.Not(nnx.Param))  # e.g. updated running stats

        if self.remat is not None:
            one_block = jax.checkpoint(one_block, policy=REMAT_POLICIES[self.remat])
        index_L = jnp.arange(L, dtype=jnp.int32)
        if self.scan:
            x_NxC, rest = jax.lax.scan(lambda x, xs: one_block(x, *xs), x_NxC,
                                       (params, rest, index_L), unroll=min(self.unroll, L))
        else:
            rests = []
            for i in range(L):
                layer = lambda tree: jax.tree.map(lambda a: a[i], tree)
                x_NxC, rest_i = one_block(x_NxC, layer(params), layer(rest), index_L[i])
                rests.append(rest_i)
            rest = jax.tree.map(lambda *a: jnp.stack(a), *rests) if rests else rest
        nnx.update(self.blocks, rest)
        return x_NxC

    def __call__(self, tokens_BxT):
        """Logits [N, V] through the tied output embedding."""
        return self.tok_embed.attend(self.features(tokens_BxT))


def make_model(cfg, *, vocab_size, max_len, seed, remat=None):
    return GPT(cfg, vocab_size=vocab_size, max_len=max_len, remat=remat,
               rngs=nnx.Rngs(params=seed))


def param_group(path):
    """(layer, part) of a parameter path: the names per-layer gradient norms are logged under.

    Block parameters give ('block', 'attn' | 'mlp' | 'norm') and carry the stacked [L] axis;
    the rest give their module's name ('tok_embed', 'pos_embed', 'final_norm') and no part.
    """
    if path[0] == "blocks":
        part = "norm" if "norm" in path[1] else path[1]
        return "block", part
    return path[0], None


def loss_fn(logits_NxV, targets_BxT):
    """Mean next-token cross entropy, in float32."""
    targets_N = targets_BxT.reshape(-1)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_NxV.astype(jnp.float32), targets_N).mean()
