import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normexp.config import load
from normexp.optim import learning_rate, make_optimizer


def test_weight_decay_shrinks_matrices_and_spares_gains_and_biases():
    # With zero gradients Adam's part of the update is 0: what is left is the decay alone.
    from flax import nnx
    cfg = load(None, ["optim.weight_decay=0.1", "optim.warmup_steps=0", "optim.lr=0.5"]).optim
    params = nnx.State({"kernel": nnx.Param(jnp.full((3, 2), 2.0), weight_decay=True),
                        "scale": nnx.Param(jnp.full((4, 2), 2.0)),  # a stacked [L, C] gain
                        "bias": nnx.Param(jnp.full((2,), 2.0))})
    tx = make_optimizer(cfg, total_steps=10)
    updates, opt = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    # the step multiplies by the run's peak lr: the schedule factor is 1 at step 0 here
    np.testing.assert_allclose(updates["kernel"][...], -1.0 * 0.1 * 2.0)
    np.testing.assert_array_equal(updates["scale"][...], 0.0)
    np.testing.assert_array_equal(updates["bias"][...], 0.0)
    np.testing.assert_allclose(learning_rate(opt, 0.5), 0.5)


@pytest.mark.parametrize("overrides", [[], ["model.weight_norm=true", "model.qk_norm=per_head",
                                            "model.placement=normformer"]])
def test_the_model_decays_its_kernels_and_embeddings_only(tiny, overrides):
    """The blocks' gains and biases are 2-D ([L, C], stacked), and must not be decayed."""
    from flax import nnx
    from normexp.optim import decay_mask
    from normexp.step import init_state
    _, _, state = init_state(tiny(*overrides), 64)
    decayed = {"/".join(map(str, path)) for path, v in
               nnx.to_flat_state(decay_mask(state["params"])) if v.get_value()}
    expected = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(state["params"])
                if path[-1] in ("kernel", "embedding", "pos_embed")}
    assert decayed == expected and "blocks/attn/qkv/kernel" in decayed


def test_the_schedule_warms_up_then_decays_to_its_floor():
    cfg = load(None, ["optim.warmup_steps=4", "optim.min_lr_ratio=0.1"]).optim
    tx = make_optimizer(cfg, total_steps=20)
    params = {"w": jnp.ones((2, 2))}
    opt, factors = tx.init(params), []
    for _ in range(21):  # the state records the learning rate of the update just made
        _, opt = tx.update(jax.tree.map(jnp.zeros_like, params), opt, params)
        factors.append(float(learning_rate(opt, 2.0)))
    np.testing.assert_allclose(factors[:5], [0.0, 0.5, 1.0, 1.5, 2.0], rtol=1e-6)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    np.testing.assert_allclose(factors[20], 0.2, rtol=1e-5)



def train_gains(tiny, *overrides):
    """The final norm's gain as the model uses it after each of two steps of the tiny model,
    and the learning rate of the second."""
    from normexp import data as data_lib
    from normexp.step import init_state, make_train_step
    from normexp.weights import gain
    cfg = tiny("optim.lr=0.02", "optim.warmup_steps=0", *overrides)
    graphdef, tx, state = init_state(cfg, 64)
    step = make_train_step(graphdef, tx, grad_norms=True)
    corpus = data_lib.load_corpus("", 0, cfg.data.seq_len)
    gains = []
    for i in range(2):
        batch = data_lib.batch(corpus.train, seed=0, step=i, batch_size=4,
                               seq_len=cfg.data.seq_len)
        state, metrics = step(state, *(jnp.asarray(b) % 64 for b in batch))
        assert np.isfinite(float(metrics["update_ratio/final_norm"]))
        gains.append(np.asarray(gain(state["params"]["final_norm"]["scale"]), np.float64))
    return (*gains, float(metrics["lr"]))


@pytest.mark.parametrize("weight_decay", [0.0, 5.0])
def test_unit_offset_gains_train_as_plain_gains_but_decay_toward_their_offset(tiny, weight_decay):
    """Stored as w with gamma = 1 + w, a gain gets the plain gain's gradients and Adam updates;
    only AdamW's decoupled decay differs, -lr * wd * w, toward 1. After the first step the two
    models are equal (w = 0 decays by nothing); the second decays the offset gain alone."""
    decay = f"optim.weight_decay={weight_decay}"
    plain1, plain2, lr = train_gains(tiny, decay)
    offset1, offset2, _ = train_gains(tiny, decay, "model.norm.unit_offset=true")
    np.testing.assert_array_equal(offset1, plain1)
    assert np.abs(plain1 - 1).max() > 0.01  # the gains moved
    np.testing.assert_allclose(offset2, plain2 - lr * weight_decay * (plain1 - 1), atol=2e-6)
    assert np.allclose(offset2, plain2, atol=1e-4) == (weight_decay == 0)
