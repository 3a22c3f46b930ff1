"""Where the norm sits around a sublayer F (attention or MLP), one rule per placement.

A rule `rule(x, f, n, depth)` takes the residual stream x, the sublayer f, the sublayer's norms
n (`n.input`, `n.output`, rezero's gate `n.gate`, nGPT's eigen learning rates `n.eigen`) and
the block's `Depth`, and reads like
the equation in its paper. `@rule("input", ...)` declares which norms it uses, so the block
creates exactly those. A `Placement` pairs the rules of the attention and MLP sublayers with
the few things a placement changes outside them (embedding norm, norms inside attention or the
MLP, DeepNet's init gain, a second residual stream); `model.placement` picks one by name.

Inside the scan over blocks `depth.index` is a traced integer: a rule that differs per block
uses it as an array (a scale). A rule that changes form between runs of blocks (Mix-LN) names
their boundaries in `Placement.segments`; the model scans each run on its own and the rule
reads the static `depth.segment`.
"""

import dataclasses
import math
import operator
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from normexp.weights import unit


class Depth(NamedTuple):
    """Where a block sits: `index` (0-based; a traced int32 inside the scan) of `count` blocks,
    and which of the placement's static `segments` it is in."""
    index: jax.Array
    count: int
    segment: int = 0


def rule(*norms):
    """Marks a placement rule with the sublayer norms it uses ('input', 'output', 'gate',
    'eigen')."""
    def mark(fn):
        fn.norms = norms
        return fn
    return mark


@rule("output")
def post(x, f, n, depth):
    """Post-Norm (Vaswani et al. 2017): x = N(x + F(x))."""
    return n.output(x + f(x))


@rule("input")
def pre(x, f, n, depth):
    """Pre-Norm (GPT-2; Xiong et al. 2020): x = x + F(N(x))."""
    return x + f(n.input(x))


@rule("input", "output")
def sandwich(x, f, n, depth):
    """Sandwich-LN (Ding et al. 2021, CogView) / Peri-LN (Kim et al. 2025):
    x = x + N_out(F(N_in(x)))."""
    return x + n.output(f(n.input(x)))


@rule("output")
def res_post(x, f, n, depth):
    """Res-Post-Norm (Liu et al. 2022, Swin v2; OLMo 2): x = x + N(F(x))."""
    return x + n.output(f(x))


def deepnorm_alpha(n_layer):
    """DeepNet's residual up-weighting for a decoder-only model of N blocks: (2N)^(1/4)."""
    return (2 * n_layer) ** 0.25


def deepnorm_beta(n_layer):
    """DeepNet's init gain of the value, output-projection and MLP weights: (8N)^(-1/4)."""
    return (8 * n_layer) ** -0.25


@rule("output")
def deepnorm(x, f, n, depth):
    """DeepNorm (Wang et al. 2022, DeepNet): x = N(alpha * x + F(x)), alpha = (2N)^(1/4)."""
    return n.output(deepnorm_alpha(depth.count) * x + f(x))


def mix_split(n_layer, alpha):
    """Mix-LN: how many leading blocks are Post-Norm, floor(alpha * L)."""
    return math.floor(alpha * n_layer)


@rule("input")
def mix(x, f, n, depth):
    """Mix-LN (Li et al. 2024): post in the first floor(alpha * L) blocks, pre in the rest."""
    return n.input(x + f(x)) if depth.segment == 0 else x + f(n.input(x))


@rule()
def residual(x, f, n, depth):
    """A plain residual, x = x + F(x), for sublayers normalized inside (HybridNorm's attention)."""
    return x + f(x)


@rule("input")
def lns(x, f, n, depth):
    """LayerNorm Scaling (Sun et al. 2025): x = x + F(N(x) / sqrt(l)), l = block index, 1-based."""
    scale = jax.lax.rsqrt((depth.index + 1).astype(jnp.float32))
    return x + f(n.input(x) * scale.astype(x.dtype))


@rule("output")
def resi_dual(stream, f, n, depth):
    """ResiDual (Xie et al. 2023): x' = N(x + F(x)) and d' = d + F(x), two residual streams
    (d starts as the embeddings, x_0); the model's output is x_L + N(d_L)."""
    x, d = stream
    y = f(x)
    return n.output(x + y), d + y


@rule("gate")
def rezero(x, f, n, depth):
    """ReZero (Bachlechner et al. 2020): no norm, x = x + a * F(x), a learned scalar init 0."""
    return x + n.gate(f(x))


@rule("eigen")
def ngpt(x, f, n, depth):
    """nGPT (Loshchilov et al. 2024), on the unit hypersphere: x = Norm(x + alpha * (Norm(F(x))
    - x)), Norm(v) = v / ||v||, alpha learned per feature (the eigen learning rates)."""
    return unit(x + n.eigen().astype(x.dtype) * (unit(f(x)) - x))


@dataclasses.dataclass(frozen=True)
class Placement:
    attn: Callable  # rule around attention
    mlp: Callable = None  # rule around the MLP (default: the attention rule)
    embed_norm: bool = False  # normalize the embeddings (Peri-LN)
    qkv_norm: bool = False  # norms on the projected queries, keys and values (HybridNorm, QKV)
    head_scale: bool = False  # learned per-head output scale before the projection (NormFormer)
    mid_norm: bool = False  # a norm after the MLP's activation (NormFormer)
    init_gain: Callable = None  # n_layer -> gain of v, proj and MLP init (DeepNet)
    dual: bool = False  # a second residual stream, output x_L + N(d_L) (ResiDual)
    sphere: bool = False  # nGPT's model: unit-norm embeddings, q, k and kernels, scaled logits
    segments: Callable = None  # (n_layer, cfg) -> block boundaries, e.g. (0, 1, 4) (Mix-LN)
    requires: tuple = ()  # (model key, value, why): settings it cannot do without

    def __post_init__(self):
        if self.mlp is None:
            object.__setattr__(self, "mlp", self.attn)

    @property
    def norm_free(self):
        """Uses no norm layer at all (model.norm.kind must be none)."""
        return ("norm.kind", "none") in [(key, value) for key, value, _ in self.requires]

    def overrides(self):
        """The settings it requires, as command-line overrides ('model.norm.kind=none')."""
        return [f"model.{key}={str(value).lower()}" for key, value, _ in self.requires]

    def check(self, model):
        """What is wrong with the `model` config section for this placement, or None."""
        for key, value, why in self.requires:
            got = operator.attrgetter(key)(model)
            if got != value:
                return (f"model.{key}: placement {model.placement!r} {why}, got {got!r} "
                        f"(set model.{key}={str(value).lower()})")
        return None


PLACEMENTS = {
    "post": Placement(post),
    "pre": Placement(pre),
    "sandwich": Placement(sandwich),
    "peri": Placement(sandwich, embed_norm=True),
    "res_post": Placement(res_post),
    "deepnorm": Placement(deepnorm, init_gain=deepnorm_beta),
    "mix": Placement(mix, segments=lambda L, cfg: (0, mix_split(L, cfg.mix_alpha), L)),
    "hybrid": Placement(residual, mlp=post, qkv_norm=True),
    "qkv": Placement(residual, mlp=pre, qkv_norm=True),
    "normformer": Placement(sandwich, mlp=pre, head_scale=True, mid_norm=True),
    "lns": Placement(lns),
    "resi_dual": Placement(resi_dual, dual=True),
    "rezero": Placement(rezero, requires=(("norm.kind", "none", "uses no norm"),)),
    "ngpt": Placement(ngpt, sphere=True, requires=(
        ("norm.kind", "none", "normalizes by projecting onto the unit sphere, with no norm layer"),
        ("bias", False, "has no biases (they would move the hidden states off the sphere)"),
        ("weight_norm", False, "keeps its kernels unit-norm itself"))),
}
