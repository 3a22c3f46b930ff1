"""normexp.weights: the inits, the linear layers, and what a parameter declares about itself
(weight decay, a unit-offset gain, nGPT's unit-norm axis) with the post-update projection."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from normexp import custom_grads
from normexp.placement import PLACEMENTS
from normexp.weights import (UNIT_EPS, Scaling, WeightNormLinear, decays, effective, gain,
                             gain_param, is_offset_gain, kernel_std, linear_maker, normal_init,
                             on_sphere, project, unit)

from conftest import model_of


def f64(x):
    return np.asarray(x, np.float64)


def flat(state):
    return {"/".join(map(str, path)): v for path, v in nnx.to_flat_state(state)}


# -- inits --------------------------------------------------------------------------------------

@pytest.mark.parametrize("std, gain_, from_column", [(0.02, 1.0, 0), (0.02 / math.sqrt(8), 1.0, 0),
                                                     (0.5, 0.3, 512), (1.0, 2.0, 100)])
def test_normal_init_is_std_times_a_standard_normal_with_the_gain_from_its_column(std, gain_,
                                                                                  from_column):
    """w = std * z, z ~ N(0, 1), the columns from `from_column` on times `gain` (DeepNet's v)."""
    key, shape = jax.random.key(3), (256, 768)
    w = f64(normal_init(std, gain_, from_column)(key, shape))
    z = f64(jax.random.normal(key, shape, jnp.float32))
    expected = std * z
    expected[:, from_column:] *= gain_
    np.testing.assert_allclose(w, expected, rtol=1e-6, atol=0)
    # and the sample std is the formula's: within 2% (the estimate's error is ~0.2% here)
    if from_column:
        assert w[:, :from_column].std() == pytest.approx(std, rel=0.02)
    assert w[:, from_column:].std() == pytest.approx(std * gain_, rel=0.02)
    assert abs(w.mean()) < 4 * std * max(gain_, 1.0) / math.sqrt(w.size)


def test_normal_init_keeps_the_requested_dtype():
    w = normal_init(0.02, 0.5, 2)(jax.random.key(0), (4, 6), jnp.bfloat16)
    assert w.dtype == jnp.bfloat16 and w.shape == (4, 6)


@pytest.mark.parametrize("din, dout", [(128, 128), (128, 512), (512, 128), (768, 2304), (1, 1)])
def test_kernel_std_is_the_configured_std_or_glorots(din, dout):
    """gpt2: the configured std, whatever the shape; xavier: Glorot's sqrt(2 / (din + dout))."""
    assert kernel_std("gpt2", din, dout, 0.02) == 0.02
    assert kernel_std("xavier", din, dout, 0.02) == pytest.approx(
        float(np.sqrt(np.float64(2.0) / (din + dout))), rel=1e-15)
    assert kernel_std("xavier", din, dout, 0.02) == kernel_std("xavier", dout, din, 123.0)


@pytest.mark.parametrize("init, din, dout", [("gpt2", 128, 512), ("xavier", 128, 512),
                                             ("xavier", 512, 128)])
def test_a_layer_from_the_maker_has_its_inits_std(init, din, dout):
    make = linear_maker(weight_norm=False, bias=True, dtype=jnp.float32, custom_grad=False,
                        rngs=nnx.Rngs(0))
    std = kernel_std(init, din, dout, 0.02)
    layer = make(din, dout, normal_init(std))
    assert f64(layer.kernel[...]).std() == pytest.approx(std, rel=0.02)
    np.testing.assert_array_equal(layer.bias[...], 0.0)


# -- linear layers ------------------------------------------------------------------------------

def test_weight_normalized_kernel_is_g_times_unit_columns_and_invariant_to_v_scale():
    layer = WeightNormLinear(8, 5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (3, 8))
    before = layer(x)
    v = np.asarray(layer.kernel[...], np.float64)
    np.testing.assert_allclose(layer.g[...], np.linalg.norm(v, axis=0), rtol=1e-6)
    layer.g[...] = jnp.asarray(np.random.default_rng(8).normal(size=5), jnp.float32)
    w = np.asarray(layer.g[...], np.float64) * v / np.linalg.norm(v, axis=0)
    expected = np.asarray(x, np.float64) @ w + np.asarray(layer.bias[...])
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.kernel[...] = layer.kernel[...] * 3.7
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(before, expected, atol=1e-3)  # g really moved the output


def test_weight_norm_computes_the_plain_layers_function_at_init_and_both_g_and_v_train():
    init = normal_init(0.3)
    weight_normed = WeightNormLinear(6, 4, kernel_init=init, rngs=nnx.Rngs(1))
    plain = nnx.Linear(6, 4, kernel_init=init, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (5, 6))
    np.testing.assert_allclose(weight_normed(x), plain(x), rtol=1e-5, atol=1e-6)
    graphdef, params = nnx.split(weight_normed, nnx.Param)
    grads = flat(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 3))(params))
    assert set(grads) == {"kernel", "bias", "g"}
    assert all(float(jnp.abs(g[...]).max()) > 0 for g in grads.values())
    # the gradient of v is orthogonal to v, column by column: v / ||v|| is scale-invariant
    v, gv = f64(weight_normed.kernel[...]), f64(grads["kernel"][...])
    cosines = (v * gv).sum(0) / (np.linalg.norm(v, axis=0) * np.linalg.norm(gv, axis=0))
    np.testing.assert_allclose(cosines, 0.0, atol=1e-5)


@pytest.mark.parametrize("weight_norm", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_the_maker_builds_one_kind_of_layer_and_declares_its_kernel_decayed(weight_norm, bias):
    make = linear_maker(weight_norm=weight_norm, bias=bias, dtype=jnp.float32,
                        custom_grad=False, rngs=nnx.Rngs(0))
    layer = make(8, 3, normal_init(0.02))
    assert type(layer) is (WeightNormLinear if weight_norm else nnx.Linear)
    params = flat(nnx.state(layer, nnx.Param))
    expected = {"kernel"} | ({"bias"} if bias else set()) | ({"g"} if weight_norm else set())
    assert set(params) == expected
    assert {name for name, v in params.items() if decays(v)} == {"kernel"}
    assert all(v.get_metadata().get("sphere_axis") is None for v in params.values())


def test_custom_gradient_layers_compute_the_plain_layers_values_and_gradients():
    x = jax.random.normal(jax.random.key(1), (5, 8))
    layers = [linear_maker(weight_norm=False, bias=True, dtype=jnp.float32, custom_grad=c,
                           rngs=nnx.Rngs(0))(8, 3, normal_init(0.5)) for c in (False, True)]
    assert layers[1].dot_general is custom_grads.dot_general
    assert layers[0].dot_general is not custom_grads.dot_general

    def value_and_grads(layer):
        graphdef, params = nnx.split(layer, nnx.Param)
        loss = lambda p, x: jnp.sum(jnp.tanh(nnx.merge(graphdef, p)(x)))
        return loss(params, x), jax.grad(loss, argnums=(0, 1))(params, x)

    (plain, plain_grads), (custom, custom_grads_) = map(value_and_grads, layers)
    np.testing.assert_allclose(custom, plain, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(custom_grads_)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


# -- which parameters are decayed ---------------------------------------------------------------

DECAY_CASES = {
    "pre": [],
    "offset gains, qk-norm, normformer": ["model.norm.unit_offset=true", "model.qk_norm=per_head",
                                          "model.placement=normformer"],
    "weight norm, scalenorm offset": ["model.weight_norm=true", "model.norm.kind=scalenorm",
                                      "model.norm.unit_offset=true"],
    "rezero": ["model.placement=rezero", "model.norm.kind=none"],
    "ngpt": ["model.placement=ngpt", *PLACEMENTS["ngpt"].overrides()],
}


def is_norm_gain(path):
    """A norm layer's gain: `scale` (LayerNorm, RMSNorm, ...) or `g` (ScaleNorm) of a module whose
    name says norm; not weight norm's g, NormFormer's head scale or ReZero's gate."""
    *modules, leaf = path.split("/")
    return leaf in ("scale", "g") and any("norm" in m for m in modules)


@pytest.mark.parametrize("case", DECAY_CASES)
def test_kernels_embeddings_and_offset_gains_are_decayed_and_nothing_else(tiny, case):
    """AdamW decays what a parameter declares at its creation: every kernel, both embeddings
    and unit-offset gains (toward their offset); never a bias, a plain gain, weight norm's g,
    a gate or nGPT's scalings. Declared, not read off the shape: stacked gains are 2-D."""
    overrides = DECAY_CASES[case]
    offset = "model.norm.unit_offset=true" in overrides
    params = flat(nnx.state(model_of(tiny, *overrides), nnx.Param))
    expected = {p for p in params if p.split("/")[-1] in ("kernel", "embedding", "pos_embed")
                or (offset and is_norm_gain(p))}
    assert {p for p, v in params.items() if decays(v)} == expected
    assert {p for p, v in params.items() if is_offset_gain(v)} == (
        {p for p in params if is_norm_gain(p)} if offset else set())
    assert any(v.ndim == 2 and not decays(v) for v in params.values())  # stacked, not decayed


def test_ngpt_declares_its_kernels_and_embeddings_on_the_sphere_along_the_model_width(tiny):
    """W_q, W_k, W_v and W_1 are unit per output unit (over their inputs, axis -2), W_o and W_2
    per input unit (over their outputs, axis -1), the embeddings per token and position."""
    params = flat(nnx.state(model_of(tiny, *DECAY_CASES["ngpt"]), nnx.Param))
    axes = {p: v.get_metadata().get("sphere_axis") for p, v in params.items()}
    assert {p: a for p, a in axes.items() if a is not None} == {
        "blocks/attn/qkv/kernel": -2, "blocks/mlp/up/kernel": -2,
        "blocks/attn/proj/kernel": -1, "blocks/mlp/down/kernel": -1,
        "tok_embed/embedding": -1, "pos_embed": -1}
    for p, axis in axes.items():
        if axis is not None:
            assert decays(params[p]), p
            np.testing.assert_allclose(np.linalg.norm(f64(params[p][...]), axis=axis), 1.0,
                                       rtol=1e-6, err_msg=p)
    plain = flat(nnx.state(model_of(tiny), nnx.Param))
    assert all(v.get_metadata().get("sphere_axis") is None for v in plain.values())


# -- unit-offset gains --------------------------------------------------------------------------

@pytest.mark.parametrize("init", [1.0, math.sqrt(24)])
def test_a_unit_offset_gain_is_stored_as_zero_used_as_init_plus_w_and_decayed(init):
    plain, offset = gain_param((3,), init, False), gain_param((3,), init, True)
    np.testing.assert_array_equal(plain[...], np.float32(init))
    np.testing.assert_array_equal(offset[...], 0.0)
    np.testing.assert_array_equal(gain(plain), gain(offset))  # the same function at init
    assert not decays(plain) and not is_offset_gain(plain)
    assert decays(offset) and is_offset_gain(offset)
    assert offset.get_metadata()["gain_offset"] == init
    offset[...] = jnp.asarray([0.5, -0.25, 0.0])
    np.testing.assert_allclose(gain(offset), init + np.asarray([0.5, -0.25, 0.0]), rtol=1e-6)
    assert gain_param((), init, True).shape == () and gain_param((), init, False).shape == ()


def test_effective_adds_the_offset_to_offset_gains_alone_and_changes_nothing_in_place():
    w = jnp.asarray([0.5, -0.25])
    state = nnx.State({"scale": gain_param((2,), 1.0, True), "plain": gain_param((2,), 2.0, False),
                       "kernel": nnx.Param(jnp.ones((2, 2)), weight_decay=True)})
    state["scale"][...] = w
    used = effective(state)
    np.testing.assert_allclose(used["scale"][...], 1.0 + np.asarray(w))
    np.testing.assert_array_equal(used["plain"][...], 2.0)
    np.testing.assert_array_equal(used["kernel"][...], 1.0)
    np.testing.assert_array_equal(state["scale"][...], w)  # the stored w is untouched
    assert type(used["scale"]) is nnx.Param and decays(used["kernel"])


def test_scaling_starts_at_its_init_and_moves_at_init_over_scale_per_unit_of_w():
    """nGPT: s = w * s_init / s_scale with w starting at s_scale, so one unit of Adam's step on
    w moves s by s_init / s_scale."""
    s = Scaling((4,), 0.05, 1 / math.sqrt(64))
    np.testing.assert_allclose(s(), 0.05, rtol=1e-6)
    np.testing.assert_allclose(s.w[...], 1 / math.sqrt(64), rtol=1e-6)
    graphdef, params = nnx.split(s, nnx.Param)
    grad = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)()))(params)
    np.testing.assert_allclose(grad["w"][...], 0.05 * math.sqrt(64), rtol=1e-6)
    assert not decays(s.w)


# -- nGPT's sphere and the post-update projection -----------------------------------------------

def np_unit(x, axis):
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def test_unit_divides_by_the_norm_along_its_axis_and_keeps_zero_vectors_zero():
    x = np.random.default_rng(0).normal(size=(3, 4, 5))
    for axis in (-1, -2, 0):
        np.testing.assert_allclose(unit(jnp.asarray(x, jnp.float32), axis), np_unit(x, axis),
                                   rtol=1e-6, atol=1e-7)
    zero = unit(jnp.zeros((2, 3)))
    assert bool(jnp.all(zero == 0)) and UNIT_EPS > 0
    tiny = unit(jnp.asarray([[1e-30, 0.0]]))  # below the floor: scaled, not blown up
    assert bool(jnp.all(jnp.isfinite(tiny))) and float(jnp.abs(tiny).max()) < 1e-10


def test_unit_computes_in_float32_and_returns_the_input_dtype():
    x = jax.random.normal(jax.random.key(0), (8, 64), jnp.bfloat16)
    y = unit(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.linalg.norm(f64(y.astype(jnp.float32)), axis=-1), 1.0,
                               rtol=1e-2)


def sphere_state(rng):
    return nnx.State({
        "rows": on_sphere(jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32), -1),
        "cols": on_sphere(jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32), -2),
        "bias": nnx.Param(jnp.asarray(rng.normal(size=(7,)), jnp.float32)),
        "scale": gain_param((7,), 1.0, True)})


def test_on_sphere_declares_its_axis_and_decay_and_starts_unit_norm():
    state = sphere_state(np.random.default_rng(0))
    for name, axis in (("rows", -1), ("cols", -2)):
        v = state[name]
        assert v.get_metadata()["sphere_axis"] == axis and decays(v)
        np.testing.assert_allclose(np.linalg.norm(f64(v[...]), axis=axis), 1.0, rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_project_renormalizes_every_sphere_parameter_after_an_update_and_nothing_else(jit):
    """The step's post-update hook: each sphere parameter's vectors along its axis become unit
    norm again, in the direction the update left them; the other parameters are untouched."""
    rng = np.random.default_rng(1)
    state = sphere_state(rng)
    update = jax.tree.map(lambda v: jnp.asarray(rng.normal(0, 0.3, v.shape), jnp.float32),
                          state)
    moved = jax.tree.map(lambda p, u: p + u, state, update)
    projected = (jax.jit(project) if jit else project)(moved)
    for name, axis in (("rows", -1), ("cols", -2)):
        got = f64(projected[name][...])
        np.testing.assert_allclose(np.linalg.norm(got, axis=axis), 1.0, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(got, np_unit(f64(moved[name][...]), axis), rtol=1e-5,
                                   atol=1e-7, err_msg=name)
        assert projected[name].get_metadata()["sphere_axis"] == axis and decays(projected[name])
    for name in ("bias", "scale"):
        np.testing.assert_array_equal(projected[name][...], moved[name][...])
    assert is_offset_gain(projected["scale"]) and not decays(projected["bias"])
    again = project(projected)  # already on the sphere: unchanged
    for name in ("rows", "cols"):
        np.testing.assert_allclose(again[name][...], projected[name][...], rtol=1e-6, atol=1e-7)
