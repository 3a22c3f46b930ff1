"""A decoder-only GPT whose norm and placement are config switches (Flax NNX).

Shape letters: B batch, T time (sequence), N = B*T tokens, C model width, H heads, K head
width (C / H), F MLP hidden width, V vocabulary. Activations flow as 2-D [N, C] so every
projection is a plain 2-D matmul and weight gradients need no transposing copies on CPU.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from normexp.norms import make_norm
from normexp.placement import PLACEMENTS


class Attention(nnx.Module):
    """Causal multi-head self-attention on [N, C] activations."""

    def __init__(self, d_model, n_head, *, bias, init_std, out_std, rngs):
        self.n_head = n_head
        self.qkv = nnx.Linear(d_model, 3 * d_model, use_bias=bias, rngs=rngs,
                              kernel_init=nnx.initializers.normal(init_std))
        self.proj = nnx.Linear(d_model, d_model, use_bias=bias, rngs=rngs,
                               kernel_init=nnx.initializers.normal(out_std))

    def __call__(self, x_NxC, seq_len):
        N, C = x_NxC.shape
        T, H = seq_len, self.n_head
        B, K = N // T, C // H
        qkv_BxTx3xHxK = self.qkv(x_NxC).reshape(B, T, 3, H, K)
        q_BxHxTxK, k_BxHxTxK, v_BxHxTxK = qkv_BxTx3xHxK.transpose(2, 0, 3, 1, 4)
        att_BxHxTxT = jnp.einsum("bhtk,bhsk->bhts", q_BxHxTxK, k_BxHxTxK) / math.sqrt(K)
        # An additive mask (0 on and below the diagonal, -inf above) is cheaper than `where`.
        mask_TxT = np.triu(np.full((T, T), -np.inf, np.float32), k=1)
        p_BxHxTxT = jax.nn.softmax(att_BxHxTxT.astype(jnp.float32) + mask_TxT, axis=-1)
        y_BxHxTxK = jnp.einsum("bhts,bhsk->bhtk", p_BxHxTxT.astype(v_BxHxTxK.dtype), v_BxHxTxK)
        return self.proj(y_BxHxTxK.transpose(0, 2, 1, 3).reshape(N, C))


class MLP(nnx.Module):
    """Two-layer perceptron with exact GELU: W2 gelu(W1 x)."""

    def __init__(self, d_model, d_hidden, *, bias, init_std, out_std, rngs):
        self.up = nnx.Linear(d_model, d_hidden, use_bias=bias, rngs=rngs,
                             kernel_init=nnx.initializers.normal(init_std))
        self.down = nnx.Linear(d_hidden, d_model, use_bias=bias, rngs=rngs,
                               kernel_init=nnx.initializers.normal(out_std))

    def __call__(self, x_NxC):
        return self.down(jax.nn.gelu(self.up(x_NxC), approximate=False))


class Block(nnx.Module):
    """One transformer block: attention then MLP, each wrapped by the placement rule."""

    def __init__(self, cfg, *, out_std, rngs):
        norm = dict(eps=cfg.norm.eps, bias=cfg.norm.bias, rngs=rngs)
        lin = dict(bias=cfg.bias, init_std=cfg.init_std, out_std=out_std, rngs=rngs)
        self.placement = PLACEMENTS[cfg.placement]
        self.attn_norm = make_norm(cfg.norm.kind, cfg.d_model, **norm)
        self.attn = Attention(cfg.d_model, cfg.n_head, **lin)
        self.mlp_norm = make_norm(cfg.norm.kind, cfg.d_model, **norm)
        self.mlp = MLP(cfg.d_model, cfg.mlp_ratio * cfg.d_model, **lin)

    def __call__(self, x_NxC, seq_len):
        x_NxC = self.placement(x_NxC, lambda h: self.attn(h, seq_len), self.attn_norm)
        return self.placement(x_NxC, self.mlp, self.mlp_norm)


class GPT(nnx.Module):
    """Token + learned position embeddings, n_layer blocks, optional final norm, tied head."""

    def __init__(self, cfg, *, vocab_size, max_len, rngs):
        std = cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layer) if cfg.scale_residual_init else std
        self.tok_embed = nnx.Embed(vocab_size, cfg.d_model, rngs=rngs,
                                   embedding_init=nnx.initializers.normal(std))
        self.pos_embed = nnx.Param(std * jax.random.normal(rngs.params(), (max_len, cfg.d_model)))
        self.blocks = nnx.List([Block(cfg, out_std=out_std, rngs=rngs)
                                for _ in range(cfg.n_layer)])
        self.final_norm = (make_norm(cfg.norm.kind, cfg.d_model, eps=cfg.norm.eps,
                                     bias=cfg.norm.bias, rngs=rngs) if cfg.final_norm else None)

    def features(self, tokens_BxT):
        """The residual stream after the last block (and final norm), as [N, C]."""
        B, T = tokens_BxT.shape
        x_BxTxC = self.tok_embed(tokens_BxT) + self.pos_embed[:T]
        x_NxC = x_BxTxC.reshape(B * T, -1)
        for block in self.blocks:
            x_NxC = block(x_NxC, T)
        if self.final_norm is not None:
            x_NxC = self.final_norm(x_NxC)
        return x_NxC

    def __call__(self, tokens_BxT):
        """Logits [N, V] through the tied output embedding."""
        return self.tok_embed.attend(self.features(tokens_BxT))


def make_model(cfg, *, vocab_size, max_len, seed):
    return GPT(cfg, vocab_size=vocab_size, max_len=max_len, rngs=nnx.Rngs(params=seed))


def param_group(path):
    """(layer, part) of a parameter path: the names per-layer gradient norms are logged under.

    Blocks give ('block_07', 'attn' | 'mlp' | 'norm'); the rest give their module's name
    ('tok_embed', 'pos_embed', 'final_norm') and no part.
    """
    if path[0] == "blocks":
        sub = path[2]
        part = "norm" if "norm" in sub else sub
        return f"block_{path[1]:02d}", part
    return path[0], None


def loss_fn(logits_NxV, targets_BxT):
    """Mean next-token cross entropy, in float32."""
    targets_N = targets_BxT.reshape(-1)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_NxV.astype(jnp.float32), targets_N).mean()
