import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from normexp import data as data_lib
from normexp.errors import UsageError
from normexp.metrics import per_block
from normexp.model import make_model
from normexp.norms import NORMS
from normexp.placement import (PLACEMENTS, Depth, deepnorm, deepnorm_alpha, deepnorm_beta, lns,
                               mix_split, post, pre, res_post, resi_dual, rezero, sandwich)
from normexp.step import init_state, make_train_step

T = 16
LEAKY = {"batchnorm", "instancenorm", "weightnorm"}


def tokens(seed=0, batch=3):
    return jax.random.randint(jax.random.key(seed), (batch, T), 0, 64)


def test_rules_are_their_equations():
    x = jnp.arange(4.0) - 1.5
    f = lambda h: 2 * h + 1
    n = types.SimpleNamespace(input=lambda h: h / 10, output=lambda h: h / 3 - 1,
                              gate=lambda h: 0.25 * h)
    for index in (0, 3):
        d = Depth(jnp.int32(index), 4)
        np.testing.assert_allclose(post(x, f, n, d), n.output(x + f(x)))
        np.testing.assert_allclose(pre(x, f, n, d), x + f(n.input(x)))
        np.testing.assert_allclose(sandwich(x, f, n, d), x + n.output(f(n.input(x))))
        np.testing.assert_allclose(res_post(x, f, n, d), x + n.output(f(x)))
        np.testing.assert_allclose(deepnorm(x, f, n, d), n.output(8 ** 0.25 * x + f(x)))
        np.testing.assert_allclose(lns(x, f, n, d), x + f(n.input(x) / math.sqrt(index + 1)),
                                   rtol=1e-6)
        np.testing.assert_allclose(rezero(x, f, n, d), x + 0.25 * f(x))
        xs, ds = resi_dual((x, 2 * x), f, n, d)
        np.testing.assert_allclose(xs, n.output(x + f(x)))
        np.testing.assert_allclose(ds, 2 * x + f(x))


@pytest.mark.parametrize("n_layer", [1, 4, 12, 100, 1000])
def test_deepnorm_constants_are_the_papers(n_layer):
    assert deepnorm_alpha(n_layer) == pytest.approx((2 * n_layer) ** 0.25)
    assert deepnorm_beta(n_layer) == pytest.approx((8 * n_layer) ** -0.25)


def test_deepnorm_init_gains_value_projection_and_mlp_but_not_queries_and_keys(tiny):
    cfg = tiny("model.placement=deepnorm", "model.n_layer=6", "model.d_model=128",
               "model.n_head=4", "model.init_std=0.05")
    model = make_model(cfg.model, vocab_size=64, max_len=T, seed=0)
    beta, C = (8 * 6) ** -0.25, 128
    std = lambda p, cols=slice(None): float(np.std(np.asarray(p[...])[2][:, cols]))
    qkv = model.blocks.attn.qkv.kernel
    assert std(qkv, slice(0, 2 * C)) == pytest.approx(0.05, rel=0.05)  # q, k: gain 1
    assert std(qkv, slice(2 * C, None)) == pytest.approx(0.05 * beta, rel=0.05)  # v
    for kernel in (model.blocks.attn.proj.kernel, model.blocks.mlp.up.kernel,
                   model.blocks.mlp.down.kernel):  # GPT-2's 1/sqrt(2L) does not apply on top
        assert std(kernel) == pytest.approx(0.05 * beta, rel=0.05)


@pytest.mark.parametrize("alpha, split", [(0.25, 1), (0.5, 2), (0.0, 0), (1.0, 4)])
def test_mix_is_post_in_the_first_blocks_and_pre_in_the_rest(tiny, alpha, split):
    assert mix_split(4, alpha) == split
    cfg = tiny("model.placement=mix", f"model.mix_alpha={alpha}", "model.n_layer=4")
    model = make_model(cfg.model, vocab_size=64, max_len=T, seed=0)
    x = embeddings(model, tokens())
    for i in range(4):
        block = block_of(model, i)
        rule = post if i < split else pre
        for f, n in ((lambda h: block.attn(h, T), block.attn_norms), (block.mlp, block.mlp_norms)):
            x = rule(x, f, types.SimpleNamespace(input=n.input, output=n.input), None)
    np.testing.assert_allclose(model.features(tokens()), model.final_norm(x), rtol=1e-5,
                               atol=1e-5)


def test_resi_dual_carries_two_streams_and_outputs_x_plus_normalized_d(tiny):
    cfg = tiny("model.placement=resi_dual", "model.n_layer=4")
    model = make_model(cfg.model, vocab_size=64, max_len=T, seed=0)
    x = d = embeddings(model, tokens())
    for i in range(4):
        block = block_of(model, i)
        for f, n in ((lambda h: block.attn(h, T), block.attn_norms), (block.mlp, block.mlp_norms)):
            y = f(x)
            x, d = n.output(x + y), d + y
    expected = model.final_norm(x + model.dual_norm(d))
    np.testing.assert_allclose(model.features(tokens()), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(x, d, atol=1e-2)  # two different streams


def test_rezero_starts_as_the_identity_and_refuses_a_norm(tiny):
    cfg = tiny("model.placement=rezero", "model.norm.kind=none")
    model = make_model(cfg.model, vocab_size=64, max_len=T, seed=0)
    np.testing.assert_allclose(model.features(tokens()), embeddings(model, tokens()), atol=1e-6)
    with pytest.raises(UsageError, match="model.norm.kind: placement 'rezero' uses no norm, "
                                         "got 'layernorm' \\(set model.norm.kind=none\\)"):
        tiny("model.placement=rezero")


def test_placement_extras_exist_where_their_papers_put_them(tiny):
    def model(*o):
        return make_model(tiny(*o).model, vocab_size=64, max_len=T, seed=0)
    hybrid = model("model.placement=hybrid")
    assert hybrid.blocks.attn.q_norm is not None and hybrid.blocks.attn_norms.input is None
    assert hybrid.blocks.mlp_norms.output is not None
    normformer = model("model.placement=normformer")
    assert normformer.blocks.attn.head_scale is not None
    assert normformer.blocks.mlp.mid_norm.scale.shape == (2, 4 * 32)  # [L, F]
    assert normformer.blocks.attn_norms.output is not None
    assert normformer.blocks.mlp_norms.output is None
    assert model("model.placement=peri").embed_norm is not None
    assert model("model.embed_norm=true").embed_norm is not None
    assert model().embed_norm is None
    qk = model("model.qk_norm=true")
    assert qk.blocks.attn.q_head_norm.scale.shape == (2, 16)  # per head: [L, K]


def embeddings(model, toks):
    B, T_ = toks.shape
    x = (model.tok_embed(toks) + model.pos_embed[:T_]).reshape(B * T_, -1)
    return model.embed_norm(x) if model.embed_norm is not None else x


def block_of(model, i):
    graphdef, state = nnx.split(model.blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


PAIRS = [(p, k) for p in sorted(PLACEMENTS) for k in sorted(NORMS)
         if not PLACEMENTS[p].norm_free or k == "none"]


@pytest.mark.parametrize("placement, kind", PAIRS)
def test_every_pair_is_causal_unless_documented_leaky_and_trains(tiny, placement, kind):
    check_causal_and_trains(tiny, f"model.placement={placement}", f"model.norm.kind={kind}",
                            leaky=kind in LEAKY)


@pytest.mark.parametrize("switches, leaky", [
    (["model.qk_norm=true", "model.embed_norm=true", "model.weight_norm=true"], False),
    (["model.qk_norm=true", "model.norm.kind=groupnorm", "model.norm.groups=2"], False),
    (["model.qk_norm=true", "model.norm.kind=instancenorm"], True),
    (["model.embed_norm=true", "model.placement=post", "model.norm.kind=dyt"], False),
    (["model.attn_softcap=2", "model.logit_softcap=5", "model.qk_norm=true"], False),
])
def test_switches_are_causal_and_train(tiny, switches, leaky):
    check_causal_and_trains(tiny, *switches, leaky=leaky)


def check_causal_and_trains(tiny, *overrides, leaky):
    """Causality (or the documented leak), then 10 training steps with finite loss and a
    gradient norm for every block."""
    # two blocks scanned one at a time keep 100 compilations cheap; mix puts one of each
    cfg = tiny("model.norm.groups=4", "model.d_model=16", "model.scan_unroll=1",
               "model.mix_alpha=0.5", "train.batch_size=3", *overrides)
    graphdef, tx, state = init_state(cfg, 64)
    logits_of = jax.jit(lambda s, x: nnx.merge(graphdef, s["params"], s["rest"])(x))
    x = tokens()
    logits = logits_of(state, x).reshape(3, T, -1)
    changed = x.at[:, 6:].set((x[:, 6:] + 17) % 64)
    later = logits_of(state, changed).reshape(3, T, -1)
    assert not np.allclose(later[:, 6:], logits[:, 6:])
    if leaky:
        assert not np.allclose(later[:, :6], logits[:, :6], atol=1e-6), "the leak must show"
    else:
        np.testing.assert_array_equal(later[:, :6], logits[:, :6])

    step = make_train_step(graphdef, tx, grad_norms=True)
    corpus = data_lib.load_corpus("", 0, T)
    for i in range(10):
        batch = data_lib.batch(corpus.train, seed=0, step=i, batch_size=3, seq_len=T)
        state, metrics = step(state, *(jnp.asarray(b) % 64 for b in batch))
    metrics = per_block(jax.device_get(metrics))
    assert np.isfinite(metrics["loss"])
    for i in range(2):
        assert np.isfinite(metrics[f"grad_norm/block_{i:02d}"])
        assert metrics[f"grad_norm/block_{i:02d}"] > 0


def test_per_position_batchnorm_is_causal(tiny):
    cfg = tiny("model.norm.kind=batchnorm", "model.norm.batch_stats=per_position",
               "model.placement=post")
    model = make_model(cfg.model, vocab_size=64, max_len=T, seed=0)
    graphdef, state = nnx.split(model)
    logits_of = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    x = tokens()
    for t in (0, 7, T - 2):
        changed = x.at[:, t + 1:].set((x[:, t + 1:] + 5) % 64)
        np.testing.assert_array_equal(logits_of(state, changed).reshape(3, T, -1)[:, :t + 1],
                                      logits_of(state, x).reshape(3, T, -1)[:, :t + 1])


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_scan_and_unrolled_agree_for_every_placement(tiny, placement):
    kind = "none" if PLACEMENTS[placement].norm_free else "rmsnorm"
    models = [make_model(tiny(f"model.placement={placement}", f"model.norm.kind={kind}",
                              "model.n_layer=4", *o).model, vocab_size=64, max_len=T, seed=0)
              for o in ([], ["model.scan=false"], ["model.scan_unroll=1"])]
    scanned, looped, one_by_one = (m(tokens()) for m in models)
    np.testing.assert_allclose(scanned, looped, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scanned, one_by_one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(NORMS))
def test_scan_and_unrolled_agree_for_every_norm(tiny, kind):
    """Post-Norm puts the norm on the stream itself; batch statistics come out equal too."""
    models = [make_model(tiny("model.placement=post", f"model.norm.kind={kind}",
                              "model.norm.groups=4", "model.n_layer=3", *o).model,
                         vocab_size=64, max_len=T, seed=0)
              for o in ([], ["model.scan=false"])]
    scanned, looped = (m(tokens()) for m in models)
    np.testing.assert_allclose(scanned, looped, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(models[0], nnx.BatchStat)),
                    jax.tree.leaves(nnx.state(models[1], nnx.BatchStat))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
