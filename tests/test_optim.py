import jax
import jax.numpy as jnp
import numpy as np

from normexp.config import load
from normexp.optim import learning_rate, make_optimizer


def test_weight_decay_shrinks_matrices_and_spares_gains_and_biases():
    # With zero gradients Adam's part of the update is 0: what is left is the decay alone.
    cfg = load(None, ["optim.weight_decay=0.1", "optim.warmup_steps=0", "optim.lr=0.5"]).optim
    params = {"kernel": jnp.full((3, 2), 2.0), "scale": jnp.full((2,), 2.0),
              "bias": jnp.full((2,), 2.0)}
    tx = make_optimizer(cfg, total_steps=10)
    updates, opt = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    # the step multiplies by the run's peak lr: the schedule factor is 1 at step 0 here
    np.testing.assert_allclose(updates["kernel"], -1.0 * 0.1 * 2.0)
    np.testing.assert_array_equal(updates["scale"], 0.0)
    np.testing.assert_array_equal(updates["bias"], 0.0)
    np.testing.assert_allclose(learning_rate(opt, 0.5), 0.5)


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
