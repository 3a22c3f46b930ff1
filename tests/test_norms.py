import math
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from normexp import config as config_lib
from normexp.model import evaluation_view
from normexp.weights import WeightNormLinear, effective
from normexp.norms import NORMS, make_norm

ROWS = 6  # rows (tokens) per sequence in these tests


def norm_of(kind, dim=24, *overrides, role="attn", rows=ROWS, seed=0, dtype=jnp.float32):
    cfg = config_lib.load(None, [f"model.norm.kind={kind}", "model.norm.groups=4",
                                 *(f"model.norm.{o}" for o in overrides)]).model.norm
    norm = make_norm(cfg, dim, role=role, rows_per_seq=rows, dtype=dtype, rngs=nnx.Rngs(seed))
    return randomized(norm, np.random.default_rng(seed))


def randomized(norm, rng):
    """Random gains and biases, so the references check them too."""
    for _, var in nnx.to_flat_state(nnx.state(norm, nnx.Param)):
        var[...] = jnp.asarray(rng.normal(1.0 if var.ndim == 0 else 0.8, 0.3, var.shape),
                               jnp.float32)
    return norm


def params(norm):
    """The parameters as the formula uses them (a unit-offset gain: offset + w)."""
    return {"/".join(map(str, path)): np.asarray(v[...], np.float64)
            for path, v in nnx.to_flat_state(effective(nnx.state(norm, nnx.Param)))}


# NumPy references, written from each paper's formula (float64)

def np_layernorm(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p.get("bias", 0.0)


def np_rmsnorm(x, p, eps, partial=1.0):
    k = int(np.ceil(partial * x.shape[-1]))
    return x / np.sqrt((x[..., :k] ** 2).mean(-1, keepdims=True) + eps) * p["scale"]


def np_scalenorm(x, p, eps):
    return p["g"] * x / np.maximum(np.sqrt((x ** 2).sum(-1, keepdims=True)), eps)


def np_batchnorm(x, p, eps, per_position=False):
    h = x.reshape(-1, ROWS, x.shape[-1]) if per_position else x
    mean, var = h.mean(0), h.var(0)
    return (((h - mean) / np.sqrt(var + eps)).reshape(x.shape) * p["scale"]
            + p.get("bias", 0.0))


def np_groupnorm(x, p, eps, groups=4):
    g = x.reshape(len(x), groups, -1)
    mean, var = g.mean(-1, keepdims=True), g.var(-1, keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * p["scale"] + p.get("bias", 0.0)


def np_instancenorm(x, p, eps):
    h = x.reshape(-1, ROWS, x.shape[-1])  # [B, T, C]: over T per (sequence, feature)
    mean, var = h.mean(1, keepdims=True), h.var(1, keepdims=True)
    return ((h - mean) / np.sqrt(var + eps)).reshape(x.shape) * p["scale"] + p.get("bias", 0.0)


def np_mean_only_batchnorm(x, p, eps):
    return x - x.mean(0) + p["bias"]


def np_dyt(x, p, eps):
    return p["scale"] * np.tanh(p["alpha"] * x) + p.get("bias", 0.0)


def np_derf(x, p, eps):
    erf = np.vectorize(math.erf)
    return p["scale"] * erf(p["alpha"] * x + p["shift"]) + p.get("bias", 0.0)


REFERENCES = {"layernorm": np_layernorm, "rmsnorm": np_rmsnorm, "scalenorm": np_scalenorm,
              "batchnorm": np_batchnorm, "groupnorm": np_groupnorm,
              "instancenorm": np_instancenorm, "weightnorm": np_mean_only_batchnorm,
              "dyt": np_dyt, "derf": np_derf, "none": lambda x, p, eps: x}


def test_every_registered_norm_has_a_reference():
    assert set(REFERENCES) == set(NORMS)


def check(kind, x, *overrides, ref=None, eps=1e-5, rtol=1e-4, atol=1e-4):
    norm = norm_of(kind, x.shape[-1], *overrides)
    expected = (ref or REFERENCES[kind])(x.astype(np.float64), params(norm), eps)
    got = norm(jnp.asarray(x, jnp.float32))
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", sorted(NORMS))
def test_matches_the_papers_formula_on_random_input(kind):
    x = np.random.default_rng(1).normal(2.0, 3.0, (4 * ROWS, 24))
    check(kind, x)


GAINED = sorted(k for k in NORMS if NORMS[k].has_gain)


@pytest.mark.parametrize("kind", GAINED)
def test_unit_offset_gain_is_its_offset_plus_w_and_the_same_function_at_init(kind):
    """With random w the norm is the paper's formula at gamma = offset + w; fresh, w = 0 and
    the norm equals the plain one (same seed) exactly."""
    x = np.random.default_rng(4).normal(1.0, 2.0, (2 * ROWS, 24))
    check(kind, x, "unit_offset=true")
    offset = make_norm(config_lib.load(None, [f"model.norm.kind={kind}", "model.norm.groups=4",
                                              "model.norm.unit_offset=true"]).model.norm,
                       24, role="attn", rows_per_seq=ROWS, rngs=nnx.Rngs(0))
    plain = make_norm(config_lib.load(None, [f"model.norm.kind={kind}",
                                             "model.norm.groups=4"]).model.norm,
                      24, role="attn", rows_per_seq=ROWS, rngs=nnx.Rngs(0))
    stored = [v for _, v in nnx.to_flat_state(nnx.state(offset, nnx.Param))
              if "gain_offset" in v.get_metadata()]
    assert len(stored) == 1 and not np.asarray(stored[0][...]).any()  # w = 0
    np.testing.assert_array_equal(offset(jnp.asarray(x, jnp.float32)),
                                  plain(jnp.asarray(x, jnp.float32)))


@pytest.mark.parametrize("kind", ["layernorm", "groupnorm", "instancenorm", "batchnorm", "dyt",
                                  "derf"])
def test_without_bias(kind):
    x = np.random.default_rng(2).normal(1.0, 2.0, (2 * ROWS, 24))
    check(kind, x, "bias=false")
    assert norm_of(kind, 24, "bias=false").bias is None


def test_partial_rmsnorm_estimates_the_rms_from_the_first_features():
    x = np.random.default_rng(3).normal(0.5, 2.0, (ROWS, 24))
    check("rmsnorm", x, "partial=0.25", ref=lambda x, p, eps: np_rmsnorm(x, p, eps, 0.25))
    full = norm_of("rmsnorm")(jnp.asarray(x, jnp.float32))
    part = norm_of("rmsnorm", 24, "partial=0.25")(jnp.asarray(x, jnp.float32))
    assert not np.allclose(full, part, atol=1e-3)


def test_per_position_batchnorm_keeps_statistics_per_position():
    x = np.random.default_rng(4).normal(1.0, 2.0, (4 * ROWS, 24))
    check("batchnorm", x, "batch_stats=per_position",
          ref=lambda x, p, eps: np_batchnorm(x, p, eps, per_position=True))


def test_groupnorm_group_count_matters():
    x = np.random.default_rng(5).normal(size=(ROWS, 24))
    check("groupnorm", x, "groups=8", ref=lambda x, p, eps: np_groupnorm(x, p, eps, 8))


@pytest.mark.parametrize("kind", sorted(NORMS))
def test_constant_input_gives_finite_output(kind):
    for value in (0.0, 3.0):
        y = norm_of(kind)(jnp.full((2 * ROWS, 24), value, jnp.float32))
        assert np.isfinite(np.asarray(y)).all(), (kind, value)


@pytest.mark.parametrize("kind", sorted(NORMS))
@pytest.mark.parametrize("scale", [1e-4, 1e4])
def test_very_small_and_very_large_inputs_match_the_reference(kind, scale):
    x = np.random.default_rng(6).normal(size=(2 * ROWS, 24)) * scale
    # eps matters at tiny scales (it is part of every formula); compare relative to the output
    norm = norm_of(kind)
    expected = REFERENCES[kind](x, params(norm), 1e-5)
    got = np.asarray(norm(jnp.asarray(x, jnp.float32)), np.float64)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


@pytest.mark.parametrize("kind", sorted(NORMS))
def test_bfloat16_input_is_normalized_in_float32(kind):
    norm = norm_of(kind)
    x16 = (jax.random.normal(jax.random.key(0), (2 * ROWS, 24)) * 50 + 20).astype(jnp.bfloat16)
    y16 = norm(x16)
    assert y16.dtype == jnp.bfloat16
    # float32 statistics: the bf16 result is the float32 result of the same input, rounded once
    y32 = norm(x16.astype(jnp.float32))
    np.testing.assert_allclose(y16.astype(jnp.float32), y32.astype(jnp.bfloat16).astype(
        jnp.float32), rtol=1e-2, atol=1e-2)


def test_float32_false_computes_in_the_activation_dtype():
    x16 = jnp.ones((ROWS, 24), jnp.bfloat16)

    def tanh_dtype(*overrides):
        norm = norm_of("dyt", 24, *overrides, dtype=jnp.bfloat16)  # the model's compute dtype
        eqns = jax.make_jaxpr(lambda x: norm(x))(x16).eqns
        return [str(e.invars[0].aval.dtype) for e in eqns if e.primitive.name == "tanh"]

    assert tanh_dtype() == ["float32"]
    assert tanh_dtype("float32=false") == ["bfloat16"]


def test_batchnorm_of_one_token_outputs_beta():
    """Documented behaviour: one sequence of one token has zero variance, so x - mean = 0 and
    every output is beta (eps keeps it finite)."""
    norm = norm_of("batchnorm", 8, rows=1)
    y = norm(jnp.asarray(np.random.default_rng(7).normal(size=(1, 8)), jnp.float32))
    np.testing.assert_allclose(y[0], norm.bias[...], atol=1e-6)


def test_layernorm_is_shift_and_scale_invariant():
    norm = norm_of("layernorm", 16)
    x = jax.random.normal(jax.random.key(2), (5, 16))
    shift = jax.random.normal(jax.random.key(3), (5, 1)) * 10
    np.testing.assert_allclose(norm(x), norm(x + shift), atol=2e-4)
    np.testing.assert_allclose(norm(x), norm(7.5 * x), atol=1e-4)


@pytest.mark.parametrize("kind", ["rmsnorm", "scalenorm"])
def test_rms_and_scale_norms_are_scale_but_not_shift_invariant(kind):
    norm = norm_of(kind, 16, "eps=1e-10")
    x = jax.random.normal(jax.random.key(4), (5, 16))
    np.testing.assert_allclose(norm(x), norm(0.01 * x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(norm(x), norm(40.0 * x), rtol=1e-4, atol=1e-5)
    assert not np.allclose(norm(x), norm(x + 3.0), atol=1e-2)


def test_dyt_alpha_init_is_configured_per_site():
    def alpha(role):
        cfg = config_lib.load(None, ["model.norm.kind=dyt", "model.norm.alpha_attn=0.8",
                                     "model.norm.alpha_mlp=0.3", "model.norm.alpha_final=0.1"])
        norm = make_norm(cfg.model.norm, 8, role=role, rows_per_seq=1, rngs=nnx.Rngs(0))
        return float(norm.alpha[...])
    assert (alpha("attn"), alpha("mlp"), alpha("final")) == pytest.approx((0.8, 0.3, 0.1))


def test_leak_and_batch_statistics_properties():
    leaky = {k for k in NORMS if norm_of(k).leaks_across_positions}
    batch = {k for k in NORMS if norm_of(k).batch_statistics}
    assert leaky == {"batchnorm", "instancenorm", "weightnorm"}
    assert batch == {"batchnorm", "weightnorm"}
    assert not norm_of("batchnorm", 24, "batch_stats=per_position").leaks_across_positions


@pytest.mark.parametrize("kind", ["batchnorm", "weightnorm"])
def test_batch_statistics_train_and_eval_differ_and_running_stats_converge(kind):
    norm = norm_of(kind, 4, "momentum=0.8")
    mu, sigma = np.array([1.0, -2.0, 0.5, 3.0]), np.array([2.0, 0.5, 1.0, 3.0])
    rng = np.random.default_rng(9)
    step = nnx.jit(lambda n, x: n(x))
    for _ in range(60):
        step(norm, jnp.asarray(rng.normal(mu, sigma, (64 * ROWS, 4)), jnp.float32))
    stats = norm.stats if kind == "batchnorm" else norm
    np.testing.assert_allclose(stats.mean[...], mu, atol=0.1)
    if kind == "batchnorm":
        np.testing.assert_allclose(np.sqrt(stats.var[...]), sigma, rtol=0.05)
    x = jnp.asarray(rng.normal(mu + 1.0, sigma, (ROWS, 4)), jnp.float32)
    train_out = step(norm, x)
    eval_out = evaluation_view(norm)(x)
    assert not np.allclose(train_out, eval_out, atol=1e-2)
    frozen = np.asarray(stats.mean[...])
    evaluation_view(norm)(x)
    np.testing.assert_array_equal(stats.mean[...], frozen)  # evaluation never updates them


def test_unknown_norm_names_the_choices():
    cfg = config_lib.load(None, []).model.norm
    import dataclasses
    with pytest.raises(ValueError, match="layernorm"):
        make_norm(dataclasses.replace(cfg, kind="batchnrm"), 8, role="attn", rows_per_seq=1,
                  rngs=nnx.Rngs(0))


@pytest.mark.parametrize("overrides, message", [
    (["model.norm.kind=groupnorm", "model.norm.groups=5"],
     "model.norm.groups: 5 does not divide model.d_model = 128"),
    (["model.norm.kind=groupnorm", "model.norm.groups=64", "model.qk_norm=per_head"],
     "model.norm.groups: 64 does not divide the head width (model.qk_norm=per_head) = 32"),
    (["model.norm.kind=layernorm", "model.norm.partial=0.5"],
     "model.norm.partial: only rmsnorm has a partial RMS, got kind 'layernorm'"),
    (["model.norm.kind=weightnorm", "model.norm.unit_offset=true"],
     "model.norm.unit_offset: norm kind 'weightnorm' has no gain"),
    (["model.norm.kind=none", "model.qk_norm=shared"],
     "model.qk_norm: norm kind 'none' would make that norm the identity (choose a "
     "model.norm.kind, or turn model.qk_norm off)"),
])
def test_each_norm_states_the_configs_it_refuses(overrides, message):
    with pytest.raises(config_lib.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_lib.load(None, overrides)
    assert config_lib.load(None, ["model.norm.kind=rmsnorm", "model.norm.partial=0.5"])


def test_a_new_norm_is_one_class_and_one_registry_line(monkeypatch):
    """What the model and the config need from a norm comes from its class: no other file
    names a kind (weightnorm's kernels, groupnorm's and rmsnorm's checks, the leak report)."""
    from normexp.model import make_model
    from normexp.norms import Norm

    class Doubled(Norm, nnx.Module):
        weight_normalized_kernels = True

        def __init__(self, dim, cfg, site, rngs):
            pass

        def __call__(self, x):
            return 2 * x

        @classmethod
        def check(cls, model):
            return "model.norm.eps: doubled wants eps 1" if model.norm.eps != 1 else None

    monkeypatch.setitem(NORMS, "doubled", Doubled)
    with pytest.raises(config_lib.UsageError, match="doubled wants eps 1"):
        config_lib.load(None, ["model.norm.kind=doubled"])
    cfg = config_lib.load(None, ["model.norm.kind=doubled", "model.norm.eps=1",
                                 "model.n_layer=1", "model.d_model=16", "model.n_head=2"])
    model = make_model(cfg.model, vocab_size=16, max_len=8, seed=0)
    assert isinstance(model.blocks.attn.qkv, WeightNormLinear)
    assert isinstance(model.final_norm, Doubled)
    assert all(isinstance(m, Norm) for m in (model.final_norm, model.blocks.attn_norms.input))


@pytest.mark.parametrize("convention", ["unbiased", "biased"])
@pytest.mark.parametrize("stats", ["pooled", "per_position"])
def test_batchnorm_running_variance_follows_its_convention(convention, stats):
    """After k training calls from r = 1, r = m^k + sum_i (1 - m) m^(k-1-i) v_i, v_i the batch
    variance of the m_rows rows, times m_rows / (m_rows - 1) when unbiased (the paper, PyTorch)."""
    norm = norm_of("batchnorm", 4, "momentum=0.7", f"running_var={convention}",
                   f"batch_stats={stats}")
    rng = np.random.default_rng(3)
    step = nnx.jit(lambda n, x: n(x))
    expected = None
    for _ in range(3):
        x = rng.normal(0.5, 2.0, (5 * ROWS, 4))
        h = x.reshape(-1, ROWS * 4) if stats == "per_position" else x
        v = h.var(0) * (len(h) / (len(h) - 1) if convention == "unbiased" else 1.0)
        expected = (np.ones_like(v) if expected is None else expected) * 0.7 + 0.3 * v
        step(norm, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(norm.stats.var[...], expected, rtol=1e-5)
    frozen = np.asarray(norm.stats.var[...])
    evaluation_view(norm)(jnp.asarray(x, jnp.float32))
    np.testing.assert_array_equal(norm.stats.var[...], frozen)  # evaluation never updates it
