"""Normalization layers, each a small NNX module registered by name in `NORMS`.

Every norm is built as `NORMS[kind](dim, cfg, site, rngs)` (`cfg` the `model.norm` section,
`site` where it sits) and maps rows [R, dim] to rows [R, dim]. Rows are tokens (or, for
per-head norms, token-heads) in sequence order, `site.rows_per_seq` to a sequence, so the
norms that pool over a batch or over time can see the sequences. By default a norm computes
in float32 whatever the activation dtype and casts back (`model.norm.float32`).

Each norm declares, as a `Norm`, what the rest of normexp must know about it: whether it uses
batch statistics or leaks across positions, whether the model weight-normalizes its kernels
with it, and which configs it refuses (`check`). Adding a norm touches this file, its test and
its README row, nothing else. Where Flax ships the paper's norm we build on it.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from normexp import custom_grads
from normexp.weights import gain, gain_param


class Site(NamedTuple):
    """Where a norm sits: its `role` (attn | mlp | final, picks DyT's alpha init), how many rows
    form one sequence, the dtype it computes in, and whether to use hand-written backwards."""
    role: str
    rows_per_seq: int
    dtype: jnp.dtype
    custom_grad: bool = True


class Norm:
    """What every norm declares. A researcher must know two things before trusting a causal
    model built with a norm: `batch_statistics` (the output depends on the other sequences of
    the batch; training and evaluation differ) and `leaks_across_positions` (a position's
    output depends on later positions)."""

    batch_statistics = False
    leaks_across_positions = False
    weight_normalized_kernels = False  # the model weight-normalizes its attention and MLP kernels
    has_gain = True  # a learned gain gamma, which `model.norm.unit_offset` stores as 1 + w
    squashes = False  # y = gamma f(alpha x + s) + beta, f saturating; `squash_params`: (alpha, s)
    partial_rms = False  # takes `model.norm.partial`

    @classmethod
    def check(cls, model):
        """What is wrong with the `model` config section for this norm, in one line, or None."""
        if model.norm.partial < 1 and not cls.partial_rms:
            return (f"model.norm.partial: only rmsnorm has a partial RMS, got kind "
                    f"{model.norm.kind!r}")
        if model.norm.unit_offset and not cls.has_gain:
            return f"model.norm.unit_offset: norm kind {model.norm.kind!r} has no gain"
        return None

    def gain_and_bias(self, dim, cfg, init=1.0, bias=True):
        """The learned gain gamma (`scale`, `init` at init; stored as w with gamma = init + w
        under `model.norm.unit_offset`) and, if `bias` and `model.norm.bias`, beta (`bias`)."""
        self.scale = gain_param((dim,), init, cfg.unit_offset)
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32)) if bias and cfg.bias else None

    def affine(self, y):
        """y * gamma + beta, in y's dtype."""
        y = y * gain(self.scale).astype(y.dtype)
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


def _site_dtype(cfg, activation_dtype):
    return jnp.float32 if cfg.float32 else activation_dtype


class LayerNorm(Norm, nnx.Module):
    """LayerNorm (Ba, Kiros & Hinton 2016, arXiv:1607.06450), over the features of each row:

        y = (x - mean(x)) / sqrt(var(x) + eps) * gamma + beta

    `model.norm.bias: false` drops beta (nanoGPT's bias-free variant). The statistics are taken
    in float32; in float32 the closed-form backward of `custom_grads.layer_norm` replaces autodiff.
    """

    def __init__(self, dim, cfg, site, rngs):
        self.gain_and_bias(dim, cfg)
        self.epsilon, self.dtype = cfg.eps, site.dtype
        self.fast = site.custom_grad and site.dtype == jnp.float32

    def __call__(self, x):
        if self.fast:
            bias = self.bias[...] if self.bias is not None else jnp.zeros(x.shape[-1:])
            return custom_grads.layer_norm(x, gain(self.scale), bias, self.epsilon)
        h = x.astype(jnp.float32)
        centred = h - h.mean(-1, keepdims=True)
        y = centred * jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + self.epsilon)
        return self.affine(y.astype(self.dtype)).astype(x.dtype)


class RMSNorm(Norm, nnx.Module):
    """RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467), over the features of each row:

        y = x / sqrt(mean_k(x^2) + eps) * gamma

    where the mean runs over the first k = ceil(p * dim) features: p = `model.norm.partial`
    (1 = RMSNorm, p < 1 = the paper's partial pRMSNorm). No centering and no bias.
    """

    partial_rms = True

    def __init__(self, dim, cfg, site, rngs):
        self.gain_and_bias(dim, cfg, bias=False)
        self.epsilon, self.dtype = cfg.eps, site.dtype
        self.k = math.ceil(cfg.partial * dim)
        self.fast = site.custom_grad and site.dtype == jnp.float32 and self.k == dim

    def __call__(self, x):
        if self.fast:
            return custom_grads.rms_norm(x, gain(self.scale), self.epsilon)
        h = x.astype(self.dtype)
        mean_square = jnp.square(h[..., :self.k].astype(jnp.float32)).mean(-1, keepdims=True)
        y = h * jax.lax.rsqrt(mean_square + self.epsilon).astype(self.dtype)
        return self.affine(y).astype(x.dtype)


class ScaleNorm(Norm, nnx.Module):
    """ScaleNorm (Nguyen & Salazar 2019, arXiv:1910.05895): one learned scalar g for the layer,

        y = g * x / max(||x||_2, eps),   g initialised to sqrt(dim)

    (the paper's init, which gives unit-RMS outputs like LayerNorm's; under
    `model.norm.unit_offset` g = sqrt(dim) + w).
    """

    def __init__(self, dim, cfg, site, rngs):
        self.eps, self.dtype = cfg.eps, site.dtype
        self.g = gain_param((), math.sqrt(dim), cfg.unit_offset)

    def __call__(self, x):
        h = x.astype(self.dtype)
        norm = jnp.sqrt(jnp.sum(jnp.square(h.astype(jnp.float32)), -1, keepdims=True))
        y = h * (gain(self.g) / jnp.maximum(norm, self.eps)).astype(self.dtype)
        return y.astype(x.dtype)


class BatchNorm(Norm, nnx.Module):
    """BatchNorm (Ioffe & Szegedy 2015, arXiv:1502.03167), per feature:

        y = (x - mu_B) / sqrt(sigma_B^2 + eps) * gamma + beta

    training with the statistics mu_B, sigma_B^2 of the batch, evaluation with running averages
    (r <- momentum * r + (1 - momentum) * batch value), which live in the model state and are
    checkpointed. `model.norm.batch_stats: pooled` (the literature's choice) pools batch and
    time, so every position sees later ones; `per_position` keeps statistics per position over
    the batch only, so nothing flows from later positions (but across the batch it still does).
    A batch of one sequence of one token has zero variance: every output is beta.
    The running variance averages the unbiased m / (m - 1) sigma_B^2 over the m rows of a batch
    (the paper's Alg. 2, and PyTorch's), unless `model.norm.running_var: biased` (Flax's choice).
    Built on `nnx.BatchNorm` (which holds the running statistics); eval mode is
    `nnx.view(model, use_running_average=True)`.
    """

    batch_statistics = True

    def __init__(self, dim, cfg, site, rngs):
        self.per_position = cfg.batch_stats == "per_position"
        self.leaks_across_positions = not self.per_position
        self.rows = site.rows_per_seq
        features = dim * self.rows if self.per_position else dim
        self.stats = nnx.BatchNorm(features, momentum=cfg.momentum, epsilon=cfg.eps,
                                   use_bias=False, use_scale=False, use_fast_variance=False,
                                   dtype=site.dtype, rngs=rngs)
        self.gain_and_bias(dim, cfg)
        self.unbiased = cfg.running_var == "unbiased"

    def __call__(self, x):
        rows, dim = x.shape
        h = x.reshape(-1, self.rows * dim) if self.per_position else x  # [B, T*dim]: per position
        before = self.stats.var[...]
        y = self.stats(h).reshape(rows, dim)
        if self.unbiased and not self.stats.use_running_average:
            # nnx.BatchNorm has just averaged the biased variance in; average the unbiased one
            m, momentum = h.shape[0], self.stats.momentum
            batch_var = jnp.var(h.astype(jnp.float32), axis=0)
            self.stats.var[...] = jax.lax.stop_gradient(
                momentum * before + (1 - momentum) * batch_var * (m / max(m - 1, 1)))
        return self.affine(y).astype(x.dtype)


class MeanOnlyBatchNorm(Norm, nnx.Module):
    """Mean-only BatchNorm (Salimans & Kingma 2016, arXiv:1602.07868, section 3):

        y = x - mu_B + beta

    centering with the batch mean in training and its running average in evaluation, no
    scaling; the paper pairs it with weight-normalized kernels (the `weightnorm` kind).
    `model.norm.batch_stats` chooses pooled or per-position statistics as for `batchnorm`.
    """

    batch_statistics = True
    weight_normalized_kernels = True  # the paper's pairing: the `weightnorm` kind
    has_gain = False

    def __init__(self, dim, cfg, site, rngs):
        self.per_position = cfg.batch_stats == "per_position"
        self.leaks_across_positions = not self.per_position
        self.rows, self.momentum, self.dtype = site.rows_per_seq, cfg.momentum, site.dtype
        self.use_running_average = False
        self.mean = nnx.BatchStat(jnp.zeros((self.rows, dim) if self.per_position else (dim,),
                                            jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

    def set_view(self, use_running_average=None, **kwargs):
        if use_running_average is not None:
            self.use_running_average = use_running_average
        return kwargs

    def __call__(self, x):
        rows, dim = x.shape
        h = x.astype(self.dtype)
        h = h.reshape(-1, self.rows, dim) if self.per_position else h
        if self.use_running_average:
            mean = self.mean[...]
        else:
            mean = h.astype(jnp.float32).mean(0)
            self.mean[...] = jax.lax.stop_gradient(
                self.momentum * self.mean[...] + (1 - self.momentum) * mean)
        y = (h - mean.astype(self.dtype)).reshape(rows, dim) + self.bias[...].astype(self.dtype)
        return y.astype(x.dtype)


class GroupNorm(Norm, nnx.Module):
    """GroupNorm (Wu & He 2018, arXiv:1803.08494): the features of each row split into G groups
    (`model.norm.groups`), each normalized by its own mean and variance:

        y = (x - mean_g(x)) / sqrt(var_g(x) + eps) * gamma + beta

    G = 1 is LayerNorm; G = dim normalizes each feature alone. Built on `nnx.GroupNorm` (its
    statistics; gamma and beta are normexp's, so that they can be unit-offset).
    """

    @classmethod
    def check(cls, model):
        widths = {"model.d_model": model.d_model, "the head width (model.qk_norm=per_head)":
                  model.d_model // model.n_head if model.qk_norm == "per_head" else model.d_model}
        for what, width in widths.items():
            if width % model.norm.groups:
                return f"model.norm.groups: {model.norm.groups} does not divide {what} = {width}"
        return super().check(model)

    def __init__(self, dim, cfg, site, rngs):
        self.stats = nnx.GroupNorm(dim, num_groups=cfg.groups, epsilon=cfg.eps, use_bias=False,
                                   use_scale=False, dtype=site.dtype, use_fast_variance=False,
                                   rngs=rngs)
        self.gain_and_bias(dim, cfg)

    def __call__(self, x):
        return self.affine(self.stats(x)).astype(x.dtype)


class InstanceNorm(Norm, nnx.Module):
    """InstanceNorm (Ulyanov, Vedaldi & Lempitsky 2016, arXiv:1607.08022), per sequence and
    feature, over time:

        y_t = (x_t - mean_t'(x_t')) / sqrt(var_t'(x_t') + eps) * gamma + beta

    The statistics pool every position of the sequence, so in a causal model each position
    sees later ones (leaky). Built on `nnx.InstanceNorm` (its statistics, as for GroupNorm).
    """

    leaks_across_positions = True

    def __init__(self, dim, cfg, site, rngs):
        self.stats = nnx.InstanceNorm(dim, epsilon=cfg.eps, use_bias=False, use_scale=False,
                                      dtype=site.dtype, use_fast_variance=False, rngs=rngs)
        self.gain_and_bias(dim, cfg)
        self.rows = site.rows_per_seq

    def __call__(self, x):
        rows, dim = x.shape
        y = self.stats(x.reshape(-1, self.rows, dim))  # [B, T, dim]: over T per (b, dim)
        return self.affine(y.reshape(rows, dim)).astype(x.dtype)


class DynamicTanh(Norm, nnx.Module):
    """Dynamic Tanh (Zhu, Chen, He, LeCun & Liu 2025, "Transformers without Normalization",
    arXiv:2503.10622), a per-row map with no statistics at all:

        y = gamma * tanh(alpha * x) + beta

    alpha one learned scalar, initialised per site (`model.norm.alpha_attn`, `alpha_mlp`,
    `alpha_final`: the paper's LLaMA recipe uses a larger alpha before attention).
    """

    squashes = True

    def __init__(self, dim, cfg, site, rngs):
        self.dtype = site.dtype
        alpha = {"attn": cfg.alpha_attn, "mlp": cfg.alpha_mlp}.get(site.role, cfg.alpha_final)
        self.alpha = nnx.Param(jnp.full((), alpha, jnp.float32))
        self.gain_and_bias(dim, cfg)

    def __call__(self, x):
        y = jnp.tanh(self.alpha[...].astype(self.dtype) * x.astype(self.dtype))
        return self.affine(y).astype(x.dtype)

    def squash_params(self):
        """(alpha, s) of y = gamma tanh(alpha x + s) + beta: s = 0."""
        return self.alpha[...], jnp.zeros((), jnp.float32)


class DynamicErf(DynamicTanh):
    """Derf (Chen, Lu, Zhu, Sun & Liu 2025, "Stronger Normalization-Free Transformers",
    arXiv:2512.10938), DyT with the error function and a learned shift:

        y = gamma * erf(alpha * x + s) + beta

    alpha and s learned scalars; alpha initialised per site as for `dyt` (`model.norm.alpha_*`),
    s at 0. (Those inits are normexp's: DyT's recipe carried over.)
    """

    def __init__(self, dim, cfg, site, rngs):
        super().__init__(dim, cfg, site, rngs)
        self.shift = nnx.Param(jnp.zeros((), jnp.float32))

    def __call__(self, x):
        z = self.alpha[...].astype(self.dtype) * x.astype(self.dtype)
        return self.affine(jax.lax.erf(z + self.shift[...].astype(self.dtype))).astype(x.dtype)

    def squash_params(self):
        return self.alpha[...], self.shift[...]


class Identity(Norm, nnx.Module):
    """No normalization: y = x."""

    has_gain = False

    @classmethod
    def check(cls, model):
        for key in ("qk_norm", "embed_norm"):
            if getattr(model, key) not in (False, "off"):
                return (f"model.{key}: norm kind 'none' would make that norm the identity "
                        f"(choose a model.norm.kind, or turn model.{key} off)")
        return super().check(model)

    def __init__(self, dim, cfg, site, rngs):
        pass

    def __call__(self, x):
        return x


NORMS = {
    "layernorm": LayerNorm,
    "rmsnorm": RMSNorm,
    "scalenorm": ScaleNorm,
    "batchnorm": BatchNorm,
    "groupnorm": GroupNorm,
    "instancenorm": InstanceNorm,
    "weightnorm": MeanOnlyBatchNorm,  # with weight-normalized kernels
    "dyt": DynamicTanh,
    "derf": DynamicErf,
    "none": Identity,
}


def make_norm(cfg, dim, *, role, rows_per_seq, dtype=jnp.float32, custom_grad=True, rngs):
    """The `cfg.kind` norm (cfg: the `model.norm` section) for rows of width `dim`."""
    if cfg.kind not in NORMS:
        raise ValueError(f"unknown norm {cfg.kind!r}; choose from {sorted(NORMS)}")
    site = Site(role, rows_per_seq, _site_dtype(cfg, dtype), custom_grad)
    return NORMS[cfg.kind](dim, cfg, site, rngs)


def modules(model):
    """Every norm module inside `model` (for the leak and batch-statistics report)."""
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, Norm)]
