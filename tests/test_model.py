import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx


from conftest import model_of, tokens



def test_post_norm_output_has_unit_rms_per_token_and_pre_norm_does_not(tiny):
    """Post-Norm ends each block with LN, so the head sees unit-RMS tokens even without a final
    norm; Pre-Norm's residual stream is never normalized unless the final norm does it."""
    bare = ["model.final_norm=false", "model.norm.bias=false", "model.init_std=0.5"]
    post_model = model_of(tiny, "model.placement=post", *bare)
    pre_model = model_of(tiny, "model.placement=pre", *bare)
    rms = lambda h: np.sqrt(np.mean(np.square(np.asarray(h)), axis=-1))
    np.testing.assert_allclose(rms(post_model.features(tokens())), 1.0, rtol=1e-3)
    assert np.abs(rms(pre_model.features(tokens())) - 1.0).max() > 0.1
    with_final = model_of(tiny, "model.placement=pre", "model.final_norm=true", *bare[1:])
    np.testing.assert_allclose(rms(with_final.features(tokens())), 1.0, rtol=1e-3)


def test_gpt2_init_scales_residual_projections(tiny):
    model = model_of(tiny, "model.n_layer=8", "model.d_model=128", "model.n_head=4")
    std = lambda p: float(np.std(np.asarray(p[...])[3]))  # block 3 of the stacked [L] axis
    blocks = model.blocks
    out_std = 0.02 / math.sqrt(2 * 8)
    assert std(blocks.attn.qkv.kernel) == pytest.approx(0.02, rel=0.05)
    assert std(blocks.mlp.up.kernel) == pytest.approx(0.02, rel=0.05)
    assert std(blocks.attn.proj.kernel) == pytest.approx(out_std, rel=0.05)
    assert std(blocks.mlp.down.kernel) == pytest.approx(out_std, rel=0.05)
    kernels = np.asarray(blocks.attn.qkv.kernel[...])
    assert kernels.shape[0] == 8 and not np.allclose(kernels[0], kernels[1])  # independent inits
    flat = model_of(tiny, "model.n_layer=8", "model.d_model=128", "model.n_head=4",
                    "model.scale_residual_init=false", "model.init_std=0.05")
    assert std(flat.blocks.attn.proj.kernel) == pytest.approx(0.05, rel=0.05)


def test_output_embedding_is_tied(tiny):
    model = model_of(tiny)
    h = model.features(tokens())
    np.testing.assert_allclose(model(tokens()), h @ model.tok_embed.embedding[...].T,
                               rtol=1e-5, atol=1e-5)
    _, params = nnx.split(model, nnx.Param)
    assert not any("head" in str(path) for path, _ in nnx.to_flat_state(params))


def test_same_seed_same_model_other_seed_other_model(tiny):
    a, b, c = model_of(tiny), model_of(tiny), model_of(tiny, seed=1)
    np.testing.assert_array_equal(a(tokens()), b(tokens()))
    assert not np.allclose(a(tokens()), c(tokens()))


def test_fused_attention_matches_the_einsum_core(tiny):
    einsum = model_of(tiny, "model.attention=einsum")
    fused = model_of(tiny, "model.attention=xla")
    np.testing.assert_allclose(einsum(tokens()), fused(tokens()), rtol=1e-4, atol=1e-4)


def test_bfloat16_computes_in_bf16_with_float32_parameters(tiny):
    model = model_of(tiny, "model.dtype=bfloat16")
    _, params = nnx.split(model, nnx.Param)
    assert {str(v.dtype) for _, v in nnx.to_flat_state(params)} == {"float32"}
    assert model(tokens()).dtype == jnp.bfloat16
    reference = model_of(tiny)
    np.testing.assert_allclose(model(tokens()).astype(jnp.float32), reference(tokens()),
                               atol=0.05)


def test_xavier_init_uses_glorot_stds_per_projection(tiny):
    C, F = 128, 512
    model = model_of(tiny, "model.n_layer=8", f"model.d_model={C}", "model.n_head=4",
                     "model.init=xavier")
    std = lambda p, cols=slice(None): float(np.std(np.asarray(p[...])[3][:, cols]))
    blocks = model.blocks
    assert std(blocks.attn.qkv.kernel, slice(0, C)) == pytest.approx(math.sqrt(1 / C), rel=0.05)
    assert std(blocks.attn.proj.kernel) == pytest.approx(math.sqrt(1 / C), rel=0.05)
    assert std(blocks.mlp.up.kernel) == pytest.approx(math.sqrt(2 / (C + F)), rel=0.05)
    assert std(blocks.mlp.down.kernel) == pytest.approx(math.sqrt(2 / (C + F)), rel=0.05)
    assert float(np.std(np.asarray(model.tok_embed.embedding[...]))) == pytest.approx(
        C ** -0.5, rel=0.05)
    # the input is scaled by sqrt(C): a block input of ~unit scale, as in the Transformer
    assert model.embed_scale == pytest.approx(math.sqrt(C))
    scaled = model.features(tokens())
    model.embed_scale = 1.0
    assert not np.allclose(model.features(tokens()), scaled, atol=1e-3)


def test_soft_caps_bound_the_logits_and_change_the_output(tiny):
    x = tokens()
    plain = model_of(tiny, "model.init_std=0.5")
    capped = model_of(tiny, "model.init_std=0.5", "model.logit_softcap=2")
    logits, capped_logits = np.asarray(plain(x)), np.asarray(capped(x))
    assert np.abs(logits).max() > 2 and np.abs(capped_logits).max() < 2
    np.testing.assert_allclose(capped_logits, 2 * np.tanh(logits / 2), rtol=1e-5, atol=1e-6)
    attn = model_of(tiny, "model.init_std=0.5", "model.attn_softcap=0.5")
    assert not np.allclose(np.asarray(attn(x)), logits, atol=1e-4)
    graphdef, params = nnx.split(attn, nnx.Param)
    grads = jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(x) ** 2))(params)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_attention_soft_cap_matches_its_formula():
    from normexp.custom_grads import causal_attention_plain
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(0, 3, (2, 2, 5, 4)) for _ in range(3))
    z = np.einsum("bhtk,bhsk->bhts", q, k) / 2.0
    z = 1.5 * np.tanh(z / 1.5) + np.triu(np.full((5, 5), -np.inf), k=1)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    got = causal_attention_plain(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), softcap=1.5)
    np.testing.assert_allclose(got, np.einsum("bhts,bhsk->bhtk", p, v), rtol=1e-4, atol=1e-5)


def test_qk_norm_variants_change_the_output_and_their_gains_receive_gradient(tiny):
    """per_head and shared normalize different groups of features, so with two heads they
    compute different functions; the q and k gains and biases of each get gradient."""
    x = tokens()
    outputs = {}
    for variant in ("off", "per_head", "shared"):
        model = model_of(tiny, "model.init_std=0.3", f"model.qk_norm={variant}")
        outputs[variant] = np.asarray(model(x))
        if variant == "off":
            continue
        graphdef, params = nnx.split(model, nnx.Param)
        grads = jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(x) ** 2))(params)
        for name in ("q_head_norm", "k_head_norm"):
            for leaf in jax.tree.leaves(getattr(grads.blocks.attn, name)):
                assert float(jnp.abs(leaf).max()) > 0, (variant, name)
    for a, b in (("off", "per_head"), ("off", "shared"), ("per_head", "shared")):
        assert not np.allclose(outputs[a], outputs[b], atol=1e-4), (a, b)


def test_relu_activation_is_w2_relu_w1_and_changes_the_output(tiny):
    """model.activation=relu (Xiong et al.'s Transformer): the MLP is W2 max(0, W1 x + b1) + b2."""
    relu = model_of(tiny, "model.activation=relu")
    gelu = model_of(tiny)
    assert not np.allclose(relu(tokens()), gelu(tokens()), atol=1e-5)
    mlp = relu.blocks.mlp  # stacked on [L]: block 0
    p = {k: np.asarray(v, np.float64)[0] for k, v in (
        ("w1", mlp.up.kernel[...]), ("b1", mlp.up.bias[...]),
        ("w2", mlp.down.kernel[...]), ("b2", mlp.down.bias[...]))}
    x = np.random.default_rng(0).normal(size=(5, 32))
    expected = np.maximum(0, x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    graphdef, state = nnx.split(relu.blocks.mlp)
    block0 = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
    np.testing.assert_allclose(block0(jnp.asarray(x, jnp.float32)), expected, rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("placement", ["pre", "lns"])
def test_skipping_a_block_equals_zeroing_its_residual_branches(tiny, placement):
    """Layer pruning's `skip`: under x + F(N(x)) a block whose output projections are zero
    passes its input on unchanged, as a skipped block does, in the scan and in the loop."""
    cfg = ["model.n_layer=3", f"model.placement={placement}"]
    model, loop = model_of(tiny, *cfg), model_of(tiny, *cfg, "model.scan=false")
    whole = model(tokens())
    np.testing.assert_array_equal(model(tokens(), skip=jnp.int32(-1)), whole)
    for block in range(3):
        zeroed = model_of(tiny, *cfg)
        for linear in (zeroed.blocks.attn.proj, zeroed.blocks.mlp.down):
            for var in (linear.kernel, linear.bias):
                var[...] = var[...].at[block].set(0.0)
        want = zeroed(tokens())
        assert np.abs(want - whole).max() > 1e-3  # the block mattered
        np.testing.assert_allclose(model(tokens(), skip=jnp.int32(block)), want, atol=2e-6)
        np.testing.assert_allclose(loop(tokens(), skip=block), want, atol=2e-6)
