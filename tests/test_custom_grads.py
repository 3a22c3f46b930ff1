"""Every hand-written backward pass against jax.grad of the plain formula it replaces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normexp import custom_grads as cg


def plain_layer_norm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def plain_rms_norm(x, scale, eps):
    return x / jnp.sqrt(jnp.square(x).mean(-1, keepdims=True) + eps) * scale


def random(key, *shape, scale=1.0, shift=0.0):
    return jax.random.normal(jax.random.key(key), shape) * scale + shift


def assert_same_vjp(custom, plain, args, rtol=2e-5, atol=2e-6):
    """Same outputs and same input gradients for a random output cotangent."""
    y, custom_vjp = jax.vjp(custom, *args)
    y_ref, plain_vjp = jax.vjp(plain, *args)
    np.testing.assert_allclose(y, y_ref, rtol=rtol, atol=atol)
    cotangent = random(99, *y.shape)
    for got, want in zip(custom_vjp(cotangent), plain_vjp(cotangent)):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def test_gelu_matches_autodiff_of_exact_gelu():
    x = random(0, 64, 48, scale=3.0)
    assert_same_vjp(cg.gelu, lambda v: jax.nn.gelu(v, approximate=False), (x,))


@pytest.mark.parametrize("shift", [0.0, 5.0])
def test_layer_norm_matches_autodiff(shift):
    x = random(1, 32, 40, scale=2.0, shift=shift)
    scale, bias = random(2, 40, scale=0.3, shift=1.0), random(3, 40, scale=0.3)
    assert_same_vjp(lambda a, b, c: cg.layer_norm(a, b, c, 1e-5),
                    lambda a, b, c: plain_layer_norm(a, b, c, 1e-5), (x, scale, bias),
                    rtol=1e-4, atol=1e-5)


def test_rms_norm_matches_autodiff():
    x = random(4, 32, 40, scale=2.0, shift=1.0)
    scale = random(5, 40, scale=0.3, shift=1.0)
    assert_same_vjp(lambda a, b: cg.rms_norm(a, b, 1e-6),
                    lambda a, b: plain_rms_norm(a, b, 1e-6), (x, scale), rtol=1e-4, atol=1e-5)


def test_attention_matches_autodiff():
    q, k, v = (random(i, 2, 3, 16, 8) for i in (6, 7, 8))
    assert_same_vjp(cg.causal_attention, cg.causal_attention_plain, (q, k, v), rtol=1e-4,
                    atol=1e-5)


def test_layer_norm_in_bf16_keeps_dtypes():
    x = random(9, 8, 16).astype(jnp.bfloat16)
    scale = jnp.ones(16)
    y, vjp = jax.vjp(lambda a, b: cg.layer_norm(a, b, jnp.zeros(16), 1e-5), x, scale)
    dx, dscale = vjp(jnp.ones_like(y))
    assert y.dtype == dx.dtype == jnp.bfloat16 and dscale.dtype == jnp.float32


def test_matmul_matches_autodiff_and_linear_uses_it():
    x, w = random(10, 64, 24), random(11, 24, 40)
    assert_same_vjp(cg.matmul, lambda a, b: a @ b, (x, w), rtol=1e-5, atol=1e-5)
    # any other contraction goes to lax.dot_general unchanged
    dims = (((2,), (0,)), ((), ()))
    x3 = random(12, 2, 3, 24)
    np.testing.assert_allclose(cg.dot_general(x3, w, dims), jax.lax.dot_general(x3, w, dims),
                               rtol=1e-6)
