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
    qkv = model("model.placement=qkv")  # Rybakov et al.: no norm before the QKV projection
    assert qkv.blocks.attn.v_norm is not None and qkv.blocks.attn_norms.input is None
    assert qkv.blocks.mlp_norms.input is not None and qkv.blocks.mlp_norms.output is None
    normformer = model("model.placement=normformer")
    assert normformer.blocks.attn.head_scale is not None
    assert normformer.blocks.mlp.mid_norm.scale.shape == (2, 4 * 32)  # [L, F]
    assert normformer.blocks.attn_norms.output is not None
    assert normformer.blocks.mlp_norms.output is None
    assert model("model.placement=peri").embed_norm is not None
    assert model("model.embed_norm=true").embed_norm is not None
    assert model().embed_norm is None
    qk = model("model.qk_norm=per_head")
    assert qk.blocks.attn.q_head_norm.scale.shape == (2, 16)  # per head: [L, K]
    shared = model("model.qk_norm=shared")
    assert shared.blocks.attn.k_head_norm.scale.shape == (2, 32)  # the full width: [L, C]


def embeddings(model, toks):
    B, T_ = toks.shape
    x = (model.tok_embed(toks) + model.pos_embed[:T_]).reshape(B * T_, -1)
    return model.embed_norm(x) if model.embed_norm is not None else x


def block_of(model, i):
    graphdef, state = nnx.split(model.blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


PAIRS = [(p, k) for p in sorted(PLACEMENTS) for k in sorted(NORMS)
         if not PLACEMENTS[p].norm_free or k == "none"]
# the pairs whose gradients reach every block and that train 10 steps: every placement (with
# LayerNorm, or without a norm where it has none) and every norm (under Pre-Norm); the others
# compile the forward pass alone
TRAINED = {(p, "none" if PLACEMENTS[p].norm_free else "layernorm") for p in PLACEMENTS} | {
    ("pre", k) for k in NORMS}


@pytest.mark.parametrize("placement, kind", PAIRS)
def test_every_pair_is_causal_unless_documented_leaky(tiny, placement, kind):
    """And the TRAINED pairs learn."""
    check_causal_and_learns(tiny, f"model.placement={placement}", f"model.norm.kind={kind}",
                            *PLACEMENTS[placement].overrides(), leaky=kind in LEAKY,
                            train=(placement, kind) in TRAINED)


@pytest.mark.parametrize("switches, leaky", [
    (["model.qk_norm=per_head", "model.embed_norm=true", "model.weight_norm=true"], False),
    (["model.qk_norm=per_head", "model.norm.kind=groupnorm", "model.norm.groups=2"], False),
    (["model.qk_norm=per_head", "model.norm.kind=instancenorm"], True),
    (["model.embed_norm=true", "model.placement=post", "model.norm.kind=dyt"], False),
    (["model.attn_softcap=2", "model.logit_softcap=5", "model.qk_norm=per_head"], False),
])
def test_switches_are_causal_and_train(tiny, switches, leaky):
    check_causal_and_learns(tiny, *switches, leaky=leaky, train=True)


def check_causal_and_learns(tiny, *overrides, leaky, train):
    """Causality (or the documented leak) and finite logits, from one compiled forward; with
    `train`, then 10 steps of the train step with a finite loss and a gradient norm above zero
    logged for every block (the step is most of the compiling, so only the TRAINED pairs
    train)."""
    # two blocks scanned one at a time keep 100 compilations cheap; mix puts one of each
    cfg = tiny("model.norm.groups=4", "model.d_model=16", "model.scan_unroll=1",
               "model.mix_alpha=0.5", "train.batch_size=3", *overrides)
    graphdef, tx, state = init_state(cfg, 64)
    # fresh Variables in each call, so batch-statistics norms may update theirs there
    forward = jax.jit(lambda p, rest, tokens: nnx.merge(
        graphdef, p, jax.tree.map(lambda a: a, rest))(tokens))
    x = tokens()
    changed = x.at[:, 6:].set((x[:, 6:] + 17) % 64)
    logits, later = (np.asarray(forward(state["params"], state["rest"], t)).reshape(3, T, -1)
                     for t in (x, changed))
    assert not np.allclose(later[:, 6:], logits[:, 6:])
    if leaky:
        assert not np.allclose(later[:, :6], logits[:, :6], atol=1e-6), "the leak must show"
    else:
        np.testing.assert_array_equal(later[:, :6], logits[:, :6])
    assert np.all(np.isfinite(logits))
    if not train:
        return
    corpus = data_lib.load_corpus("", 0, T)
    batches = [[jnp.asarray(b) % 64 for b in data_lib.batch(corpus.train, seed=0, step=i,
                                                             batch_size=3, seq_len=T)]
               for i in range(10)]
    step = make_train_step(graphdef, tx, grad_norms=True)
    for batch in batches:
        state, metrics = step(state, *batch)
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
    required = PLACEMENTS[placement].overrides()
    models = [make_model(tiny(f"model.placement={placement}", "model.norm.kind=rmsnorm",
                              *required, "model.n_layer=4", *o).model,
                         vocab_size=64, max_len=T, seed=0)
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


NGPT = ["model.placement=ngpt", *PLACEMENTS["ngpt"].overrides()]


def np_unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_ngpt_logits(p, x, n_head):
    """nGPT's forward from the paper's equations (Loshchilov et al. 2024, sec. 2), float64:
    h <- Norm(h + alpha_A (Norm(h_A) - h)), then the same with the MLP; q and k unit per head
    times s_qk, softmax scale sqrt(d_k); logits s_z * (E h). normexp's documented variations:
    learned absolute positions, h_0 = Norm(E[x] + P[t]), and a GELU MLP whose input is scaled
    by s_u sqrt(d_model)."""
    erf = np.vectorize(math.erf)
    B, T_ = x.shape
    E, P = p["tok_embed/embedding"], p["pos_embed"]
    C = E.shape[1]
    H, K = n_head, C // n_head
    h = np_unit(E[x] + P[:T_]).reshape(B * T_, C)
    for i in range(p["blocks/attn/qkv/kernel"].shape[0]):
        q, k, v = np.split(h @ p["blocks/attn/qkv/kernel"][i], 3, axis=-1)
        s_qk = p["blocks/attn/s_qk/w"][i] * (1.0 / C ** -0.5)
        q, k, v = (a.reshape(B, T_, H, K) for a in (q, k, v))
        q, k = np_unit(q) * s_qk, np_unit(k) * s_qk
        z = np.einsum("bthk,bshk->bhts", q, k) * math.sqrt(K)
        z = z + np.triu(np.full((T_, T_), -np.inf), k=1)
        a = np.exp(z - z.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        y = np.einsum("bhts,bshk->bthk", a, v).reshape(B * T_, C)
        h_a = y @ p["blocks/attn/proj/kernel"][i]
        alpha_a = p["blocks/attn_norms/eigen/w"][i] * (0.05 / C ** -0.5)
        h = np_unit(h + alpha_a * (np_unit(h_a) - h))
        u = h @ p["blocks/mlp/up/kernel"][i] * p["blocks/mlp/s_u/w"][i] * math.sqrt(C)
        h_m = (0.5 * u * (1 + erf(u / math.sqrt(2)))) @ p["blocks/mlp/down/kernel"][i]
        alpha_m = p["blocks/mlp_norms/eigen/w"][i] * (0.05 / C ** -0.5)
        h = np_unit(h + alpha_m * (np_unit(h_m) - h))
    return (h @ E.T) * p["logit_scale/w"] * (1.0 / C ** -0.5)


def test_ngpt_is_the_papers_normalized_transformer(tiny):
    """Random (non-init) scalings, against the float64 reference written from the paper."""
    model = make_model(tiny(*NGPT).model, vocab_size=64, max_len=T, seed=0)
    rng = np.random.default_rng(0)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "w":  # the scalings: away from their inits, so each is checked
            var[...] = var[...] * jnp.asarray(rng.uniform(0.5, 3.0, var.shape), jnp.float32)
    p = {"/".join(map(str, path)): np.asarray(v[...], np.float64)
         for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    x = tokens()
    np.testing.assert_allclose(model(x), np_ngpt_logits(p, np.asarray(x), n_head=2),
                               rtol=2e-4, atol=2e-5)
    h = np.asarray(model.features(x))
    np.testing.assert_allclose(np.linalg.norm(h, axis=-1), 1.0, rtol=1e-5)  # on the sphere


def test_ngpt_weights_stay_unit_norm_through_training_and_every_scaling_learns(tiny):
    cfg = tiny(*NGPT, "optim.lr=0.01", "optim.weight_decay=0.1")
    graphdef, tx, state = init_state(cfg, 64)
    before = jax.tree.map(np.asarray, state["params"])
    step = make_train_step(graphdef, tx, grad_norms=True)
    corpus = data_lib.load_corpus("", 0, T)
    for i in range(3):
        batch = data_lib.batch(corpus.train, seed=0, step=i, batch_size=4, seq_len=T)
        state, metrics = step(state, *(jnp.asarray(b) % 64 for b in batch))
    spheres = 0
    for (path, new), (_, old) in zip(nnx.to_flat_state(state["params"]),
                                     nnx.to_flat_state(before)):
        assert not np.allclose(new[...], old[...]), path  # every parameter is trained
        axis = new.get_metadata().get("sphere_axis")
        if axis is not None:
            spheres += 1
            np.testing.assert_allclose(np.linalg.norm(new[...], axis=axis), 1.0, rtol=1e-5,
                                       err_msg=str(path))
    assert spheres == 6  # 4 kernels and 2 embeddings
    assert np.isfinite(float(metrics["loss"]))


def test_ngpt_refuses_what_would_leave_the_sphere(tiny):
    for override, message in [
            ("model.bias=true", "model.bias: placement 'ngpt' has no biases"),
            ("model.norm.kind=rmsnorm", "model.norm.kind: placement 'ngpt' normalizes by "
                                        "projecting onto the unit sphere"),
            ("model.weight_norm=true", "model.weight_norm: placement 'ngpt' keeps its kernels")]:
        with pytest.raises(UsageError, match=message):
            tiny(*NGPT, override)
