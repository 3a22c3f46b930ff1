"""The model's weights: how each is initialised, parametrised and kept in shape.

Inits (`normal_init`, `kernel_std`) and linear layers (`linear_maker`, `WeightNormLinear`), and
what a parameter declares about itself in its metadata, which the optimizer and the train step
read instead of knowing the model:

- `weight_decay`: AdamW decays it (`optim.decay_mask`): the kernels, the embeddings and
  unit-offset gains, never biases or plain gains. (Declared rather than inferred from the
  shape: the blocks' parameters are stacked on a leading [L] axis, so a gain is 2-D there.)
- `gain_offset`: a unit-offset norm gain (`model.norm.unit_offset`), stored as w and used as
  offset + w (`gain`); decayed, so weight decay pulls the gain toward its init, not 0.
- `sphere_axis`: nGPT's matrices and embeddings, whose vectors along that axis are renormalized
  to unit norm after every optimizer step (`project`, inside the jitted step).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from normexp import custom_grads

UNIT_EPS = 1e-12  # floor of a norm divided by: a zero vector stays zero rather than NaN
DECAYED = {"weight_decay": True}


def is_variable(x):
    return isinstance(x, nnx.Variable)


def _metadata(param, key):
    return param.get_metadata().get(key) if is_variable(param) else None


def decays(param):
    """Whether AdamW's weight decay applies to this parameter (declared at its creation)."""
    return bool(_metadata(param, "weight_decay"))


# -- inits and linear layers ----------------------------------------------------------------

def normal_init(std, gain=1.0, from_column=0):
    """N(0, std^2) with the columns from `from_column` on scaled by `gain` (DeepNet's v gain)."""
    def init(key, shape, dtype=jnp.float32):
        w = std * jax.random.normal(key, shape, dtype)
        return w if gain == 1.0 else w.at[:, from_column:].multiply(gain)
    return init


def kernel_std(init, din, dout, std):
    """A kernel's init std: `std` (gpt2), or Glorot's sqrt(2 / (din + dout)) (xavier)."""
    return math.sqrt(2.0 / (din + dout)) if init == "xavier" else std


class WeightNormLinear(nnx.Linear):
    """A linear layer with weight normalization (Salimans & Kingma 2016, arXiv:1602.07868):

        W = g * v / ||v||,  the norm per output unit (column of v)

    v (the `kernel`) is initialised like an ordinary kernel and g to its column norms, so the
    layer computes the same function at init as without weight normalization. (`nnx.WeightNorm`
    rewrites the wrapped kernel in place and keeps g outside the parameters, so g would not
    train; this keeps both as parameters.)
    """

    def __init__(self, din, dout, **options):
        super().__init__(din, dout, **options)
        self.g = nnx.Param(jnp.linalg.norm(self.kernel[...], axis=0))

    def __call__(self, x_NxI):
        v_IxO = self.kernel[...]
        w_IxO = v_IxO * (self.g[...] * jax.lax.rsqrt(jnp.sum(jnp.square(v_IxO), 0)))
        y_NxO = self.dot_general(x_NxI.astype(self.dtype), w_IxO.astype(self.dtype),
                                 (((1,), (0,)), ((), ())))
        if self.bias is not None:
            y_NxO = y_NxO + self.bias[...].astype(self.dtype)
        return y_NxO


def linear_maker(*, weight_norm, bias, dtype, custom_grad, rngs):
    """(din, dout, init, sphere_axis=None) -> a linear layer, the same kind everywhere in the
    model; with `sphere_axis` (nGPT) its kernel is unit-norm along that axis (-2: each output
    unit's weights over the inputs, -1: each input's weights over the outputs)."""
    cls = WeightNormLinear if weight_norm else nnx.Linear
    options = dict(use_bias=bias, dtype=dtype, kernel_metadata=DECAYED, rngs=rngs)
    if custom_grad:
        options["dot_general"] = custom_grads.dot_general

    def make(din, dout, init, sphere_axis=None):
        layer = cls(din, dout, kernel_init=init, **options)
        if sphere_axis is not None:
            layer.kernel = on_sphere(layer.kernel[...], sphere_axis)
        return layer
    return make


# -- unit-offset gains ------------------------------------------------------------------------

def gain_param(shape, init, unit_offset):
    """A norm's gain, `init` at init: stored as it is, or (unit_offset) as w = 0 used as
    init + w."""
    if unit_offset:
        return nnx.Param(jnp.zeros(shape, jnp.float32), gain_offset=float(init), **DECAYED)
    return nnx.Param(jnp.full(shape, init, jnp.float32))


def gain(param):
    """The value a gain parameter multiplies by: w, or offset + w."""
    offset = _metadata(param, "gain_offset")
    return param[...] if offset is None else param[...] + offset


def is_offset_gain(param):
    return _metadata(param, "gain_offset") is not None


def effective(params):
    """The parameters as the model uses them (offset gains with their offset added): what a
    parameter norm or an update/parameter ratio should be measured against."""
    return jax.tree.map(lambda v: v.replace(gain(v)) if is_offset_gain(v) else v, params,
                        is_leaf=is_variable)


# -- nGPT's hypersphere -----------------------------------------------------------------------

def unit(x, axis=-1):
    """x / ||x|| along `axis`, computed in float32."""
    h = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(h), axis=axis, keepdims=True))
    return (h / jnp.maximum(norm, UNIT_EPS)).astype(x.dtype)


def on_sphere(value, axis):
    """A (decayed) parameter initialised to `value` normalized along `axis`, and kept so by
    `project`."""
    return nnx.Param(unit(value, axis), sphere_axis=axis, **DECAYED)


def project(params):
    """Every sphere parameter renormalized along its axis, the rest as they are: the step's
    post-update hook (nGPT renormalizes after each optimizer step)."""
    def renormalize(v):
        axis = _metadata(v, "sphere_axis")
        return v if axis is None else v.replace(unit(v[...], axis))
    return jax.tree.map(renormalize, params, is_leaf=is_variable)


class Scaling(nnx.Module):
    """nGPT's learned scaling vectors (s_qk, s_u, s_z and the eigen learning rates alpha):

        s = w * (s_init / s_scale),   w initialised to s_scale

    so s starts at s_init while Adam moves w in steps of the global learning rate: the update
    of s is scaled by s_init / s_scale (the paper's way to give each vector its own rate)."""

    def __init__(self, shape, init, scale):
        self.w = nnx.Param(jnp.full(shape, scale, jnp.float32))
        self.factor = init / scale

    def __call__(self):
        return self.w[...] * self.factor
