import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normexp.metrics import activation_stats, param_group, per_block

from conftest import T, model_of, tokens



def reference_stats(x):
    x = np.asarray(x, np.float64)
    centred = x - x.mean()
    return {"mean": x.mean(), "rms": np.sqrt(np.mean(x ** 2)),
            "kurtosis": np.mean(centred ** 4) / np.mean(centred ** 2) ** 2 - 3}


def test_activation_statistics_match_a_numpy_reference(tiny):
    model = model_of(tiny, "model.placement=pre", "model.final_norm=false", "model.init_std=0.3")
    x = tokens()
    logits, stats = model(x, observe=activation_stats(jnp.asarray(True)))
    np.testing.assert_array_equal(logits, model(x))  # recording changes nothing computed
    assert set(stats) == {"mean", "rms", "kurtosis", "attn_input_norm_rms",
                          "mlp_input_norm_rms"}
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
    _, off = model(x, observe=activation_stats(jnp.asarray(False)))
    assert all(float(jnp.abs(v).max()) == 0.0 for v in off.values())


def test_activation_statistics_follow_the_placement(tiny):
    post = model_of(tiny, "model.placement=post", "model.final_norm=false", "model.init_std=0.3")
    _, stats = post(tokens(), observe=activation_stats(jnp.asarray(True)))
    # Post-Norm has output norms only, N(x + F(x)), which leave unit-RMS tokens (gain 1, bias 0)
    assert set(stats) == {"mean", "rms", "kurtosis", "attn_output_norm_rms",
                          "mlp_output_norm_rms"}
    np.testing.assert_allclose(stats["attn_output_norm_rms"], 1.0, rtol=1e-3)
    np.testing.assert_allclose(stats["rms"], 1.0, rtol=1e-3)  # and so is the stream
    # Sandwich has both, each recorded under its own name: N_in(x) and N_out(F(N_in(x)))
    sandwich = model_of(tiny, "model.placement=sandwich", "model.init_std=0.3")
    seen = {}
    _, stats = sandwich(tokens(), observe=lambda s: seen.setdefault(len(seen), s) and {})
    assert set(seen[0]) == {"stream", "attn_input_norm", "attn_output_norm",
                            "mlp_input_norm", "mlp_output_norm"}
    _, stats = sandwich(tokens(), observe=activation_stats(jnp.asarray(True)))
    for name in ("attn_input_norm_rms", "attn_output_norm_rms", "mlp_input_norm_rms",
                 "mlp_output_norm_rms"):
        np.testing.assert_allclose(stats[name], 1.0, rtol=1e-3)  # LayerNorm at init: RMS 1
    rezero = model_of(tiny, "model.placement=rezero", "model.norm.kind=none",
                      "model.final_norm=false")
    _, stats = rezero(tokens(), observe=activation_stats(jnp.asarray(True)))
    assert set(stats) == {"mean", "rms", "kurtosis"}  # no norm, no norm statistics


def test_param_groups_name_blocks_sublayers_and_the_norms_around_them():
    assert param_group(("blocks", "attn", "qkv", "kernel")) == ("block", "attn")
    assert param_group(("blocks", "mlp", "mid_norm", "scale")) == ("block", "mlp")
    assert param_group(("blocks", "attn_norms", "input", "scale")) == ("block", "norm")
    assert param_group(("blocks", "mlp_norms", "gate", "a")) == ("block", "norm")
    assert param_group(("final_norm", "scale")) == ("final_norm", None)
    assert param_group(("pos_embed",)) == ("pos_embed", None)


def test_per_block_names_each_block_by_the_run_directory_scheme():
    from normexp.rundir import parse_metric
    named = per_block({"grad_norm/block/attn": np.array([1.0, 2.0]), "loss": np.float32(3.0),
                       "act/block/rms": np.array([4.0, 5.0])})
    assert named == {"grad_norm/block_00/attn": 1.0, "grad_norm/block_01/attn": 2.0,
                     "loss": 3.0, "act/block_00/rms": 4.0, "act/block_01/rms": 5.0}
    assert parse_metric("act/block_01/rms") == ("act/block/rms", 1)
