import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from normexp.metrics import angular_distance, block_observer, param_group, per_block

from conftest import T, model_of, tokens



def acts(record):
    """The model's observer for the activation statistics alone, as one dict per block."""
    observe = block_observer(record)
    return lambda seen: observe(seen)["act"]


def reference_stats(x):
    x = np.asarray(x, np.float64)
    centred = x - x.mean()
    return {"mean": x.mean(), "rms": np.sqrt(np.mean(x ** 2)),
            "kurtosis": np.mean(centred ** 4) / np.mean(centred ** 2) ** 2 - 3}


STREAM = {"mean", "var", "rms", "kurtosis", "attn_update_ratio", "mlp_update_ratio"}
LINEAR = {"q_rms", "k_rms", "v_rms", "proj_rms", "up_rms", "down_rms"}


def test_activation_statistics_match_a_numpy_reference(tiny):
    model = model_of(tiny, "model.placement=pre", "model.final_norm=false", "model.init_std=0.3")
    x = tokens()
    logits, stats = model(x, observe=acts(jnp.asarray(True)))
    np.testing.assert_array_equal(logits, model(x))  # recording changes nothing computed
    assert set(stats) == STREAM | LINEAR | {"attn_input_norm_rms", "mlp_input_norm_rms"}
    assert all(v.shape == (2,) for v in stats.values())
    last = reference_stats(model.features(x))  # no final norm: the last block's output
    for key, value in last.items():
        assert float(stats[key][-1]) == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # block 0's attention input norm sees the embeddings; its gain is 1 and bias 0 at init
    e = np.asarray(model.tok_embed.embedding[...])[np.asarray(x)] + np.asarray(
        model.pos_embed[...])[:T]
    e = e.reshape(-1, e.shape[-1]).astype(np.float64)
    normed = (e - e.mean(-1, keepdims=True)) / np.sqrt(e.var(-1, keepdims=True) + 1e-5)
    assert float(stats["attn_input_norm_rms"][0]) == pytest.approx(
        np.sqrt(np.mean(normed ** 2)), rel=1e-5)
    _, off = model(x, observe=acts(jnp.asarray(False)))
    assert all(float(jnp.abs(v).max()) == 0.0 for v in off.values())


def np_layer_norm(x, p, prefix, i):
    y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    return y * p[f"{prefix}/scale"][i] + p[f"{prefix}/bias"][i]


def np_pre_ln_blocks(p, tokens_BxT, n_head):
    """Pre-LN blocks x + Attn(LN(x)), x + MLP(LN(x)) in float64, with what each block's
    statistics are made of: the stream before each sublayer and after the block, and the
    outputs of the linear layers (Rybakov et al. 2024's q, k, v, proj, up, down)."""
    erf = np.vectorize(math.erf)
    B, T_ = tokens_BxT.shape
    x = (p["tok_embed/embedding"][tokens_BxT] + p["pos_embed"][:T_]).reshape(B * T_, -1)
    C = x.shape[1]
    H, K = n_head, C // n_head
    blocks = []
    for i in range(p["blocks/attn/qkv/kernel"].shape[0]):
        linear = lambda h, name: h @ p[f"blocks/{name}/kernel"][i] + p[f"blocks/{name}/bias"][i]
        seen = {"attn_in": x}
        q, k, v = np.split(linear(np_layer_norm(x, p, "blocks/attn_norms/input", i), "attn/qkv"),
                           3, axis=-1)
        z = np.einsum("bthk,bshk->bhts", *(a.reshape(B, T_, H, K) for a in (q, k))) / np.sqrt(K)
        z = z + np.triu(np.full((T_, T_), -np.inf), k=1)
        a = np.exp(z - z.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        y = np.einsum("bhts,bshk->bthk", a, v.reshape(B, T_, H, K)).reshape(B * T_, C)
        proj = linear(y, "attn/proj")
        x = seen["mlp_in"] = x + proj
        up = linear(np_layer_norm(x, p, "blocks/mlp_norms/input", i), "mlp/up")
        down = linear(0.5 * up * (1 + erf(up / np.sqrt(2))), "mlp/down")
        x = seen["stream"] = x + down
        seen.update(q=q, k=k, v=v, proj=proj, up=up, down=down)
        blocks.append(seen)
    return blocks


def test_update_ratios_variance_and_linear_outputs_match_a_numpy_reference(tiny):
    """Random (non-init) parameters everywhere, against the float64 forward written out."""
    model = model_of(tiny, "model.placement=pre", "model.final_norm=false")
    rng = np.random.default_rng(0)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var[...] = jnp.asarray(rng.normal(0.0, 0.3, var.shape), jnp.float32)
    p = {"/".join(map(str, path)): np.asarray(v[...], np.float64)
         for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    x = tokens()
    _, stats = model(x, observe=acts(jnp.asarray(True)))
    norm = lambda a: np.sqrt(np.sum(a ** 2))
    for i, seen in enumerate(np_pre_ln_blocks(p, np.asarray(x), n_head=2)):
        expected = {
            "attn_update_ratio": norm(seen["mlp_in"] - seen["attn_in"]) / norm(seen["attn_in"]),
            "mlp_update_ratio": norm(seen["stream"] - seen["mlp_in"]) / norm(seen["mlp_in"]),
            "var": np.var(seen["stream"]),
            **{f"{name}_rms": np.sqrt(np.mean(seen[name] ** 2))
               for name in ("q", "k", "v", "proj", "up", "down")}}
        for key, value in expected.items():
            assert float(stats[key][i]) == pytest.approx(value, rel=1e-4), (i, key)


@pytest.mark.parametrize("kind", ["dyt", "derf"])
def test_saturation_and_alpha_of_squashing_norms_match_a_numpy_reference(tiny, kind):
    model = model_of(tiny, f"model.norm.kind={kind}", "model.norm.alpha_attn=5.0",
                     "model.final_norm=false", "model.init_std=0.3")
    alphas = {"attn": np.array([5.0, 3.0]), "mlp": np.array([0.5, 8.0])}
    for sublayer, norms in (("attn", model.blocks.attn_norms), ("mlp", model.blocks.mlp_norms)):
        norms.input.alpha[...] = jnp.asarray(alphas[sublayer], jnp.float32)
        if kind == "derf":  # a shift moves the saturated region: it must count
            norms.input.shift[...] = jnp.asarray([0.5, -1.0], jnp.float32)
    _, seen_by_block = model(tokens(), observe=lambda seen: seen)  # stacked [L, ...]
    _, stats = model(tokens(), observe=acts(jnp.asarray(True)))
    for sublayer in ("attn", "mlp"):
        name = f"{sublayer}_input_norm"
        shift = np.asarray(seen_by_block[f"{name}_squash"]["shift"], np.float64)
        if kind == "derf":
            np.testing.assert_array_equal(shift, [0.5, -1.0])
        for i in range(2):
            # the norm's input under Pre-Norm: the stream entering the sublayer
            x = np.asarray(seen_by_block[f"{sublayer}_in"][i], np.float64)
            z = alphas[sublayer][i] * x + shift[i]
            assert float(stats[f"{name}_saturation"][i]) == pytest.approx(
                np.mean(np.abs(z) > 2.0), abs=1e-6)
        np.testing.assert_allclose(stats[f"{name}_alpha"], alphas[sublayer])
    assert 0.05 < float(stats["attn_input_norm_saturation"][0]) < 0.95  # the test can fail
    assert set(stats) >= {"attn_input_norm_saturation", "mlp_input_norm_alpha"}
    plain = model_of(tiny, "model.final_norm=false")
    _, stats = plain(tokens(), observe=acts(jnp.asarray(True)))
    assert not any(key.endswith(("_saturation", "_alpha")) for key in stats)  # LayerNorm


def test_activation_statistics_follow_the_placement(tiny):
    post = model_of(tiny, "model.placement=post", "model.final_norm=false", "model.init_std=0.3")
    _, stats = post(tokens(), observe=acts(jnp.asarray(True)))
    # Post-Norm has output norms only, N(x + F(x)), which leave unit-RMS tokens (gain 1, bias 0)
    assert set(stats) == STREAM | LINEAR | {"attn_output_norm_rms", "mlp_output_norm_rms"}
    np.testing.assert_allclose(stats["attn_output_norm_rms"], 1.0, rtol=1e-3)
    np.testing.assert_allclose(stats["rms"], 1.0, rtol=1e-3)  # and so is the stream
    # Sandwich has both, each recorded under its own name: N_in(x) and N_out(F(N_in(x)))
    sandwich = model_of(tiny, "model.placement=sandwich", "model.init_std=0.3")
    seen = {}
    _, stats = sandwich(tokens(), observe=lambda s: seen.setdefault(len(seen), s) and {})
    assert set(seen[0]) == {"attn_in", "mlp_in", "stream", "attn_input_norm", "attn_output_norm",
                            "mlp_input_norm", "mlp_output_norm", "attn_q", "attn_k", "linear"}
    _, stats = sandwich(tokens(), observe=acts(jnp.asarray(True)))
    for name in ("attn_input_norm_rms", "attn_output_norm_rms", "mlp_input_norm_rms",
                 "mlp_output_norm_rms"):
        np.testing.assert_allclose(stats[name], 1.0, rtol=1e-3)  # LayerNorm at init: RMS 1
    rezero = model_of(tiny, "model.placement=rezero", "model.norm.kind=none",
                      "model.final_norm=false")
    _, stats = rezero(tokens(), observe=acts(jnp.asarray(True)))
    assert set(stats) == STREAM | LINEAR  # no norm, no norm statistics


def test_param_groups_name_blocks_sublayers_and_the_norms_around_them():
    assert param_group(("blocks", "attn", "qkv", "kernel")) == ("block", "attn")
    assert param_group(("blocks", "mlp", "mid_norm", "scale")) == ("block", "mlp")
    assert param_group(("blocks", "attn_norms", "input", "scale")) == ("block", "norm")
    assert param_group(("blocks", "mlp_norms", "gate", "a")) == ("block", "norm")
    assert param_group(("final_norm", "scale")) == ("final_norm", None)
    assert param_group(("pos_embed",)) == ("pos_embed", None)


def test_per_block_names_each_block_by_the_run_directory_scheme():
    from normexp.metric_names import parse_metric
    named = per_block({"grad_norm/block/attn": np.array([1.0, 2.0]), "loss": np.float32(3.0),
                       "act/block/rms": np.array([4.0, 5.0])})
    assert named == {"grad_norm/block_00/attn": 1.0, "grad_norm/block_01/attn": 2.0,
                     "loss": 3.0, "act/block_00/rms": 4.0, "act/block_01/rms": 5.0}
    assert parse_metric("act/block_01/rms") == ("act/block/rms", 1)


def np_attention(q, k):
    """The diagnostics of attention_stats from q, k [B, T, H, K], in float64."""
    T, K = q.shape[1], q.shape[3]
    mask = np.tril(np.ones((T, T), bool))
    logits = np.where(mask, np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(K), -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = -np.where(mask, p * np.log(np.where(mask, p, 1.0)), 0.0).sum(-1)  # [B, H, T]
    return {"logit_max": logits.max(), "logit_max_head": logits.max((0, 2, 3)),
            "entropy": entropy.mean(), "entropy_min": entropy.mean((0, 2)).min(),
            "q_norm": np.linalg.norm(q, axis=-1).mean(),
            "k_norm": np.linalg.norm(k, axis=-1).mean(), "sink": p[..., 0].mean()}


def layer_norm64(x, eps=1e-5):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)


@pytest.mark.parametrize("qk_norm", ["off", "per_head", "shared"])
def test_attention_diagnostics_match_a_numpy_reference(tiny, qk_norm):
    """Block 0 of a fresh Pre-Norm model by hand: LN(embeddings) -> qkv -> (per-head LN) ->
    logits, entropy, q/k norms and sink mass; the massive-activation ratio of the last block."""
    model = model_of(tiny, "model.placement=pre", "model.final_norm=false", "model.init_std=0.3",
                     f"model.qk_norm={qk_norm}")
    x = tokens()
    observe = block_observer(jnp.asarray(True), activations=False, attention=True)
    _, stats = model(x, observe=observe)
    e = np.asarray(model.tok_embed.embedding[...], np.float64)[np.asarray(x)] + np.asarray(
        model.pos_embed[...], np.float64)[:T]
    h = layer_norm64(e.reshape(-1, e.shape[-1]))
    w = np.asarray(model.blocks.attn.qkv.kernel[...], np.float64)[0]
    b = np.asarray(model.blocks.attn.qkv.bias[...], np.float64)[0]
    qkv = h @ w + b
    C, H = qkv.shape[1] // 3, 2
    q, k = (qkv[:, i * C:(i + 1) * C].reshape(x.shape[0], T, H, C // H) for i in (0, 1))
    if qk_norm == "per_head":  # gains 1 and biases 0 at init
        q, k = layer_norm64(q), layer_norm64(k)
    if qk_norm == "shared":  # over the full width: each token's heads together
        q, k = (layer_norm64(a.reshape(*a.shape[:2], C)).reshape(a.shape) for a in (q, k))
    expected = np_attention(q, k)
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(stats["attn"][name][0], np.float64), value,
                                   rtol=2e-4, atol=1e-6, err_msg=name)
    last = np.abs(np.asarray(model.features(x), np.float64))
    assert float(stats["act"]["massive"][-1]) == pytest.approx(last.max() / np.median(last),
                                                               rel=1e-4)
    assert set(stats) == {"act", "attn"} and set(stats["act"]) == {"massive"}
    _, off = model(x, observe=block_observer(jnp.asarray(False), activations=False,
                                             attention=True))
    assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree.leaves(off))


def test_per_head_values_are_named_per_block_and_head():
    named = per_block({"attn/block/logit_max_head": np.array([[1.0, 2.0], [3.0, 4.0]])})
    assert named == {"attn/block_00/logit_max_head/00": 1.0, "attn/block_00/logit_max_head/01": 2.0,
                     "attn/block_01/logit_max_head/00": 3.0, "attn/block_01/logit_max_head/01": 4.0}


def test_the_median_without_a_sort_equals_numpys():
    from normexp.metrics import median_nonneg
    rng = np.random.default_rng(0)
    median = jax.jit(median_nonneg)
    for n in (1, 2, 5, 6, 1001):
        for a in (np.abs(rng.standard_normal(n)), np.zeros(n), np.round(rng.random(n) * 3),
                  np.full(n, np.inf), rng.random(n) * 1e-30):
            a = a.astype(np.float32)
            assert float(median(jnp.asarray(a))) == pytest.approx(
                np.median(a.astype(np.float64)), rel=1e-6), (n, a)


def test_expected_gradient_is_the_norm_of_the_mean_gradient(tiny):
    """||E[g]|| over k batches against NumPy's mean of the per-batch gradients, per block; the
    mean per-batch norm beside it; one batch's gradient is the train step's."""
    from flax import nnx
    from normexp import data as data_lib
    from normexp.metrics import gradient_expectation
    from normexp.step import init_state, make_grad_step, make_train_step
    graphdef, tx, state = init_state(tiny(), 64)
    corpus = data_lib.load_corpus("", 0, T)
    batches = [[jnp.asarray(b) % 64 for b in data_lib.batch(corpus.train, seed=0, step=i,
                                                            batch_size=4, seq_len=T)]
               for i in range(3)]
    grad = make_grad_step(graphdef)
    grads = [grad(state["params"], state["rest"], *batch) for batch in batches]
    got = gradient_expectation(grads)
    flat = [{"/".join(map(str, p)): np.asarray(v[...], np.float64)
             for p, v in nnx.to_flat_state(g)} for g in grads]
    for name in ("blocks/mlp/up/kernel", "blocks/mlp/down/kernel"):
        per = np.stack([f[name] for f in flat]).reshape(3, 2, -1)  # [k, L, entries]
        np.testing.assert_allclose(got[name]["expected"], np.linalg.norm(per.mean(0), axis=1),
                                   rtol=1e-12)
        np.testing.assert_allclose(got[name]["per_batch"],
                                   np.linalg.norm(per, axis=2).mean(0), rtol=1e-12)
        assert (got[name]["expected"] < got[name]["per_batch"]).all()  # the batches differ
    assert isinstance(got["pos_embed"]["expected"], float)
    _, metrics = make_train_step(graphdef, tx, grad_norms=True)(state, *batches[0])
    block_sq = sum(np.square(v).reshape(2, -1).sum(1) for k, v in flat[0].items()
                   if k.startswith("blocks/"))
    np.testing.assert_allclose(np.asarray(metrics["grad_norm/block"]), np.sqrt(block_sq),
                               rtol=1e-5)


def test_attention_entropy_and_sink_bounds_under_the_causal_mask():
    """What the docs state: query i sees i + 1 keys, so its entropy is at most ln(i + 1) and
    uniform attention (q = 0) averages to mean_i ln(i + 1), not ln T; `sink` averages key 0's
    mass over every query, query 0's (always 1) included."""
    from normexp.metrics import attention_stats
    i = np.arange(T)
    k = jax.random.normal(jax.random.key(1), (2, T, 2, 8))
    uniform = attention_stats(jnp.zeros((2, T, 2, 8)), k)
    assert float(uniform["entropy"]) == pytest.approx(np.mean(np.log(i + 1)), rel=1e-5)
    assert float(uniform["entropy_min"]) == pytest.approx(np.mean(np.log(i + 1)), rel=1e-5)
    assert float(uniform["entropy"]) < np.log(T) - 0.5
    assert float(uniform["sink"]) == pytest.approx(np.mean(1 / (i + 1)), rel=1e-5)
    # any attention: query 0 puts all its mass on key 0, so sink >= 1/T
    q = 10 * jax.random.normal(jax.random.key(2), (2, T, 2, 8))
    assert float(attention_stats(q, k)["sink"]) >= 1 / T
    assert float(attention_stats(q, k)["entropy"]) <= np.mean(np.log(i + 1)) + 1e-6


def test_grad_rms_is_taken_before_clipping(tiny):
    """A clip far below the gradient norm: the logged RMS is the raw gradient's."""
    from test_step import one_step
    cfg = tiny("optim.clip_norm=0.001", "model.n_layer=2", "optim.warmup_steps=0")
    metrics, grads, _, _ = one_step(cfg, attention=True, log=(1, 10))
    every = np.concatenate([v.ravel() for v in grads.values()])
    assert np.linalg.norm(every) > 100 * 0.001  # clipping would have scaled it down 100x+
    assert metrics["grad_rms"] == pytest.approx(np.sqrt(np.mean(every ** 2)), rel=1e-4)
    block = np.concatenate([v.ravel() for p, v in grads.items() if p[:2] == ("blocks", 1)])
    assert metrics["grad_rms/block_01"] == pytest.approx(np.sqrt(np.mean(block ** 2)), rel=1e-4)


def test_adam_moments_and_gradient_outliers_match_a_numpy_reference(tiny):
    from normexp import data as data_lib
    from normexp.metrics import ADAM_OUTLIER_K, per_block
    from normexp.step import init_state, make_grad_step, make_train_step
    cfg = tiny("optim.warmup_steps=0", "optim.beta2=0.95")
    graphdef, tx, state = init_state(cfg, 64)
    step = make_train_step(graphdef, tx, activations=True)  # statistics at every step
    grad_of = make_grad_step(graphdef)
    corpus = data_lib.load_corpus("", 0, T)
    blocks = lambda tree: [np.asarray(v, np.float64).reshape(2, -1)  # [L, entries] per leaf
                           for path, v in nnx.to_flat_state(tree) if path[0] == "blocks"]
    for i in range(3):
        x, y = (jnp.asarray(b) % 64 for b in data_lib.batch(
            corpus.train, seed=0, step=i, batch_size=4, seq_len=T))
        grads = blocks(grad_of(state["params"], state["rest"], x, y))
        nu_before = blocks(state["opt"][1].inner_state[0].nu)
        state, metrics = step(state, x, y)
        stats = per_block(jax.device_get({k: v for k, v in metrics.items()
                                          if k.startswith("adam/")}))
        mu, nu = (blocks(getattr(state["opt"][1].inner_state[0], m)) for m in ("mu", "nu"))
        g, m, v, v_before = (np.concatenate(a, axis=1) for a in (grads, mu, nu, nu_before))
        v_hat = v_before / (1 - 0.95 ** i) if i else np.full_like(v_before, np.inf)
        outliers = np.mean(np.abs(g) > ADAM_OUTLIER_K * np.sqrt(v_hat), axis=1)
        for b in range(2):
            assert stats[f"adam/block_{b:02d}/m_rms"] == pytest.approx(
                np.sqrt(np.mean(m[b] ** 2)), rel=1e-5)
            assert stats[f"adam/block_{b:02d}/v_sqrt_rms"] == pytest.approx(
                np.sqrt(np.mean(v[b])), rel=1e-5)
            assert stats[f"adam/block_{b:02d}/outliers"] == pytest.approx(outliers[b], abs=1e-6)
        if i == 0:
            assert np.all(outliers == 0)  # no history yet
    assert outliers.max() > 0  # the rule can flag entries


def test_angular_distance_is_arccos_of_the_cosine_over_pi():
    """Per token arccos(cos(a, b)) / pi in float64, averaged; exact at 0, 1/2 and 1."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 16))
    b = a + rng.normal(scale=[[0.01]] * 25 + [[3.0]] * 25, size=(50, 16))  # near and far
    cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    want = np.mean(np.arccos(np.clip(cos, -1, 1))) / np.pi
    got = angular_distance(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    assert float(got) == pytest.approx(want, rel=1e-5)
    e = jnp.eye(4)
    assert float(angular_distance(e, 3 * e)) == pytest.approx(0.0, abs=1e-7)
    assert float(angular_distance(e, jnp.roll(e, 1, axis=1))) == pytest.approx(0.5, abs=1e-7)
    assert float(angular_distance(e, -e)) == pytest.approx(1.0, abs=1e-7)
