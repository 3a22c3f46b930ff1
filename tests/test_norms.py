import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from normexp.norms import NORMS, LayerNorm, RMSNorm, make_norm


def np_layernorm(x, gamma, beta, eps):
    """Ba et al. 2016: (x - mean) / sqrt(var + eps) * gamma + beta, over the last axis."""
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def np_rmsnorm(x, gamma, eps):
    """Zhang & Sennrich 2019: x / sqrt(mean(x^2) + eps) * gamma, over the last axis."""
    x = x.astype(np.float64)
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * gamma


def randomized(norm, rng):
    """Set the norm's gain and bias to random values so the reference checks them too."""
    norm.scale[...] = jnp.asarray(rng.normal(1.0, 0.3, norm.scale.shape), jnp.float32)
    if getattr(norm, "bias", None) is not None:
        norm.bias[...] = jnp.asarray(rng.normal(0.0, 0.3, norm.bias.shape), jnp.float32)
    return norm


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_numpy_reference(bias):
    rng = np.random.default_rng(0)
    norm = randomized(LayerNorm(24, eps=1e-5, bias=bias), rng)
    x = rng.normal(3.0, 2.0, (7, 24)).astype(np.float32)
    beta = np.asarray(norm.bias[...]) if bias else 0.0
    expected = np_layernorm(x, np.asarray(norm.scale[...]), beta, 1e-5)
    np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)
    assert (norm.bias is None) == (not bias)


def test_rmsnorm_matches_numpy_reference():
    rng = np.random.default_rng(1)
    norm = randomized(RMSNorm(24, eps=1e-6), rng)
    x = rng.normal(1.0, 2.0, (7, 24)).astype(np.float32)
    expected = np_rmsnorm(x, np.asarray(norm.scale[...]), 1e-6)
    np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def test_eps_is_used():
    x = jnp.full((1, 8), 1e-3).at[0, 0].set(-1e-3)
    small, large = RMSNorm(8, eps=1e-12)(x), RMSNorm(8, eps=1.0)(x)
    assert not np.allclose(small, large)
    np.testing.assert_allclose(large, np_rmsnorm(np.asarray(x), 1.0, 1.0), rtol=1e-5)


def test_layernorm_is_shift_and_scale_invariant():
    rng = np.random.default_rng(2)
    norm = randomized(LayerNorm(16, eps=1e-6), rng)
    x = jnp.asarray(rng.normal(size=(5, 16)), jnp.float32)
    shift = jnp.asarray(rng.normal(size=(5, 1)) * 10, jnp.float32)
    np.testing.assert_allclose(norm(x), norm(x + shift), atol=2e-4)
    np.testing.assert_allclose(norm(x), norm(7.5 * x), atol=1e-4)


def test_rmsnorm_is_scale_but_not_shift_invariant():
    rng = np.random.default_rng(3)
    norm = randomized(RMSNorm(16, eps=1e-10), rng)
    x = jnp.asarray(rng.normal(size=(5, 16)), jnp.float32)
    np.testing.assert_allclose(norm(x), norm(0.01 * x), atol=1e-4)
    np.testing.assert_allclose(norm(x), norm(40.0 * x), atol=1e-4)
    assert not np.allclose(norm(x), norm(x + 3.0), atol=1e-2)


@pytest.mark.parametrize("kind", sorted(NORMS))
def test_norms_keep_shape_and_dtype_and_compute_in_float32(kind):
    norm = make_norm(kind, 32, eps=1e-5, bias=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (6, 32)) * 50 + 20
    y16 = norm(x.astype(jnp.bfloat16))
    assert y16.shape == x.shape and y16.dtype == jnp.bfloat16
    # statistics in float32: the bf16 result is the float32 result rounded once
    np.testing.assert_allclose(y16.astype(jnp.float32), norm(x.astype(jnp.bfloat16).astype(
        jnp.float32)).astype(jnp.bfloat16).astype(jnp.float32), atol=1e-2)


@pytest.mark.parametrize("kind", sorted(NORMS))
def test_jit_equals_eager(kind):
    norm = make_norm(kind, 32, eps=1e-5, bias=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (6, 32))
    np.testing.assert_allclose(nnx.jit(lambda n, v: n(v))(norm, x), norm(x), rtol=1e-6, atol=1e-6)


def test_unknown_norm_names_the_choices():
    with pytest.raises(ValueError, match="layernorm"):
        make_norm("batchnrm", 8, eps=1e-5, bias=True, rngs=nnx.Rngs(0))
