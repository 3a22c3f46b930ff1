"""Hand-written backward passes (`jax.custom_vjp`): GELU, LayerNorm, RMSNorm, attention, matmul.

Autodiff of the plain formulas saves many intermediates (erf's pieces, the attention scores
and their softmax, the centred input and its variance); inside the scan over blocks each saved
intermediate is a stacked [L, ...] buffer that XLA:CPU copies. These versions save only what
their closed-form backward needs. Each is tested against `jax.grad` of the plain formula
(`model.custom_grads: false` uses the plain formulas).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@jax.custom_vjp
def gelu(x):
    """Exact GELU, x * Phi(x); the backward multiplies by Phi(x) + x phi(x), saved forward."""
    return jax.nn.gelu(x, approximate=False)


def _gelu_fwd(x):
    cdf = 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))
    slope = cdf + x * jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return x * cdf, slope


def _gelu_bwd(slope, dy):
    return (dy * slope,)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x_NxC, scale_C, bias_C, eps):
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, statistics in float32."""
    return _layer_norm_fwd(x_NxC, scale_C, bias_C, eps)[0]


def _layer_norm_fwd(x_NxC, scale_C, bias_C, eps):
    h = x_NxC.astype(jnp.float32)
    mean = h.mean(-1, keepdims=True)
    centred = h - mean
    rstd = jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + eps)
    xhat = centred * rstd
    y = (xhat * scale_C + bias_C).astype(x_NxC.dtype)
    return y, (xhat, rstd, scale_C)


def _layer_norm_bwd(eps, res, dy_NxC):
    xhat, rstd, scale_C = res
    dtype, dy = dy_NxC.dtype, dy_NxC.astype(jnp.float32)
    dxhat = dy * scale_C
    # d/dx of (x - mean) * rstd: remove the mean and the component along xhat.
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    reduce = tuple(range(dy.ndim - 1))
    return dx.astype(dtype), (dy * xhat).sum(reduce), dy.sum(reduce)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x_NxC, scale_C, eps):
    """x / sqrt(mean(x^2) + eps) * scale over the last axis, statistics in float32."""
    return _rms_norm_fwd(x_NxC, scale_C, eps)[0]


def _rms_norm_fwd(x_NxC, scale_C, eps):
    h = x_NxC.astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + eps)
    xhat = h * rstd
    return (xhat * scale_C).astype(x_NxC.dtype), (xhat, rstd, scale_C)


def _rms_norm_bwd(eps, res, dy_NxC):
    xhat, rstd, scale_C = res
    dtype, dy = dy_NxC.dtype, dy_NxC.astype(jnp.float32)
    dxhat = dy * scale_C
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    return dx.astype(dtype), (dy * xhat).sum(tuple(range(dy.ndim - 1)))


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def _causal_mask(T):
    # Additive (0 on and below the diagonal, -inf above): cheaper than `where` on CPU.
    return np.triu(np.full((T, T), -np.inf, np.float32), k=1)


def causal_attention_plain(q_BxHxTxK, k_BxHxTxK, v_BxHxTxK, softcap=0.0):
    """softmax(q k^T / sqrt(K) + causal mask) v, the softmax in float32; autodiff backward.
    With `softcap` c > 0 the logits z become c * tanh(z / c) first (Gemma 2)."""
    T, K = q_BxHxTxK.shape[-2:]
    att_BxHxTxT = jnp.einsum("bhtk,bhsk->bhts", q_BxHxTxK, k_BxHxTxK) / math.sqrt(K)
    if softcap:
        att_BxHxTxT = softcap * jnp.tanh(att_BxHxTxT / softcap)
    p_BxHxTxT = jax.nn.softmax(att_BxHxTxT.astype(jnp.float32) + _causal_mask(T), axis=-1)
    return jnp.einsum("bhts,bhsk->bhtk", p_BxHxTxT.astype(v_BxHxTxK.dtype), v_BxHxTxK)


@jax.custom_vjp
def causal_attention(q_BxHxTxK, k_BxHxTxK, v_BxHxTxK):
    """The same attention; the backward keeps only P and Y (not the scores)."""
    return causal_attention_plain(q_BxHxTxK, k_BxHxTxK, v_BxHxTxK)


def _attention_fwd(q, k, v):
    T, K = q.shape[-2:]
    att = jnp.einsum("bhtk,bhsk->bhts", q, k) / math.sqrt(K)
    p = jax.nn.softmax(att.astype(jnp.float32) + _causal_mask(T), axis=-1).astype(v.dtype)
    y = jnp.einsum("bhts,bhsk->bhtk", p, v)
    return y, (q, k, v, p, y)


def _attention_bwd(res, dy):
    q, k, v, p, y = res
    K = q.shape[-1]
    dv = jnp.einsum("bhts,bhtk->bhsk", p, dy)
    dp = jnp.einsum("bhtk,bhsk->bhts", dy, v)
    # softmax backward: ds = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dY * Y).
    row = jnp.sum(dy.astype(jnp.float32) * y.astype(jnp.float32), -1, keepdims=True)
    ds = (p.astype(jnp.float32) * (dp.astype(jnp.float32) - row)).astype(q.dtype) / math.sqrt(K)
    dq = jnp.einsum("bhts,bhsk->bhtk", ds, k)
    dk = jnp.einsum("bhts,bhtk->bhsk", ds, q)
    return dq, dk, dv


causal_attention.defvjp(_attention_fwd, _attention_bwd)


@jax.custom_vjp
def matmul(x_NxI, w_IxO):
    """x @ w; the backward transposes x before the weight-gradient matmul (see `_matmul_bwd`)."""
    return x_NxI @ w_IxO


def _matmul_fwd(x_NxI, w_IxO):
    return x_NxI @ w_IxO, (x_NxI, w_IxO)


def _matmul_bwd(res, dy_NxO):
    x_NxI, w_IxO = res
    # XLA:CPU runs x^T dy (contracting the long N axis of both) at ~55% of a plain matmul's
    # speed; a physical transpose first (kept by the barrier) makes it ~20% faster in all.
    xt_IxN = jax.lax.optimization_barrier(jnp.transpose(x_NxI))
    return dy_NxO @ w_IxO.T, xt_IxN @ dy_NxO


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dot_general(lhs, rhs, dimension_numbers, **options):
    """`lax.dot_general` for nnx.Linear: plain 2-D products go through `matmul`."""
    plain = dimension_numbers == (((1,), (0,)), ((), ()))
    if lhs.ndim == 2 and rhs.ndim == 2 and plain and not any(options.values()):
        return matmul(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, **options)
