"""Normalization layers, each a small NNX module registered by name in `NORMS`.

Every norm shares one signature, `Norm(dim, *, eps, bias, custom_grad, rngs)`, computes its
statistics in float32 whatever the input dtype, and casts back. `custom_grad` selects the
closed-form backward pass of `custom_grads` where the norm has one (same values, tested). Adding a norm is one class plus one registry
line; `model.norm.kind` in the config picks it.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from normexp import custom_grads


class LayerNorm(nnx.Module):
    """LayerNorm (Ba, Kiros & Hinton 2016, arXiv:1607.06450), over the last axis:

        y = (x - mean(x)) / sqrt(var(x) + eps) * gamma + beta

    with `bias=False` dropping beta (as in nanoGPT's bias-free variant).
    """

    leaks_across_positions = False

    def __init__(self, dim, *, eps=1e-5, bias=True, custom_grad=True, rngs=None):
        self.eps, self.custom_grad = eps, custom_grad
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32)) if bias else None

    def __call__(self, x):
        if self.custom_grad:
            bias = self.bias[...] if self.bias is not None else jnp.zeros_like(self.scale[...])
            return custom_grads.layer_norm(x, self.scale[...], bias, self.eps)
        h = x.astype(jnp.float32)
        mean = h.mean(-1, keepdims=True)
        var = jnp.square(h - mean).mean(-1, keepdims=True)
        y = (h - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467), over the last axis:

        y = x / sqrt(mean(x^2) + eps) * gamma

    No centering and no bias: `bias` is accepted for the shared signature and ignored.
    """

    leaks_across_positions = False

    def __init__(self, dim, *, eps=1e-5, bias=False, custom_grad=True, rngs=None):
        del bias
        self.eps, self.custom_grad = eps, custom_grad
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

    def __call__(self, x):
        if self.custom_grad:
            return custom_grads.rms_norm(x, self.scale[...], self.eps)
        h = x.astype(jnp.float32)
        y = h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + self.eps) * self.scale[...]
        return y.astype(x.dtype)


NORMS = {
    "layernorm": LayerNorm,
    "rmsnorm": RMSNorm,
}


def make_norm(kind, dim, *, eps, bias, custom_grad=True, rngs):
    if kind not in NORMS:
        raise ValueError(f"unknown norm {kind!r}; choose from {sorted(NORMS)}")
    return NORMS[kind](dim, eps=eps, bias=bias, custom_grad=custom_grad, rngs=rngs)
