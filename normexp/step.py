"""The pure step: state init, the train step and the eval step, jitted once per run.

The state is a plain pytree `{params, rest, opt, step, diverged_step, lr}`; `rest` holds any
non-parameter model state (none for LayerNorm/RMSNorm) and `lr` the run's peak learning rate.
Divergence is tracked on the device, so the first non-finite step is known exactly even
though the host only looks when it logs. Nothing here does I/O or reads the clock.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from normexp.metric_names import (ADAM, BLOCK, GRAD_NORM, GRAD_RMS, LOGITS, LOSS, LR, Z_LOSS,
                                  due, family)
from normexp.metrics import (adam_stats, block_observer, grad_rms, layer_stats,
                             output_logit_stats, when)
from normexp.model import evaluation_view, make_model
from normexp.optim import learning_rate, make_optimizer
from normexp.weights import project


def loss_fn(logits_NxV, targets_BxT):
    """Mean next-token cross entropy, in float32."""
    targets_N = targets_BxT.reshape(-1)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_NxV.astype(jnp.float32), targets_N).mean()


def init_state(cfg, vocab_size, kernels=None):
    """(graphdef, optimizer, state) for a fresh run; kernels: the run's hardware choices
    (default: this device's, see `model.make_model`)."""
    model = make_model(cfg.model, vocab_size=vocab_size, max_len=cfg.data.seq_len,
                       seed=cfg.run.seed, remat=cfg.train.remat_policy if cfg.train.remat else None,
                       kernels=kernels)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    state = {"params": params, "rest": rest, "opt": tx.init(params),
             "step": jnp.zeros((), jnp.int32), "diverged_step": jnp.full((), -1, jnp.int32),
             "lr": jnp.asarray(cfg.optim.lr, jnp.float32)}
    return graphdef, tx, state


def make_train_step(graphdef, tx, *, grad_norms=False, activations=False, attention=False,
                    log=None, z_loss=0.0, vectorized=False):
    """(state, inputs, targets) -> (state, metrics): forward, backward, statistics, update.

    The statistics, each computed only at the steps the loop logs, `due(step, every,
    steps - 1)` for log = (every, steps) (None: every step), and zeros at the others:
    grad_norms: per-layer gradient, parameter and update norms (`grad_norm/...`,
    `param_norm/...`, `update_ratio/...`); activations: the blocks' activation statistics
    (`act/block/...`) and AdamW's moments (`adam/block/...`); attention: the instability
    diagnostics (`attn/block/...`, `act/block/massive`, `logits/...`, `grad_rms/...`). The
    loss, the global `grad_norm` and the divergence tracking are every step's.
    z_loss: c > 0 minimises loss + c * mean(log^2 Z) (PaLM); `loss` stays the cross entropy
    and the added term is logged as `z_loss`.
    vectorized: every argument has a leading axis of runs, trained independently (jax.vmap).
    """
    every, steps = log or (1, 1)
    observing = activations or attention

    def train_step(state, inputs_BxT, targets_BxT):
        step = state["step"]
        record = due(step, every, steps - 1)

        def loss_of(params):
            # fresh Variables of this trace, so batch-statistics norms may update them here
            model = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, state["rest"]))
            if not observing:
                logits, observed = model(inputs_BxT), {}
            else:
                logits, observed = model(inputs_BxT, observe=block_observer(
                    record, activations=activations, attention=attention))
            if attention:
                observed[LOGITS] = when(record, output_logit_stats, logits)
            rest = nnx.state(model, nnx.Not(nnx.Param))
            loss = loss_fn(logits, targets_BxT)
            if not z_loss:
                return loss, (rest, observed, loss, None)
            z = z_loss * jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), -1)))
            return loss + z, (rest, observed, loss, z)

        (_, (rest, observed, loss, z)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        updates = jax.tree.map(lambda u: u * state["lr"], updates)  # tx runs at peak lr 1
        # constrained parameters (nGPT's unit-norm matrices) go back onto their constraint
        params = project(optax.apply_updates(state["params"], updates))
        grad_norm = optax.tree.norm(grads)  # before clipping, which happens inside tx
        metrics = {LOSS: loss, LR: learning_rate(opt, state["lr"]), GRAD_NORM: grad_norm}
        if z_loss:
            metrics[Z_LOSS] = z
        if grad_norms:
            metrics.update(when(record, layer_stats, state["params"], grads, updates))
        for prefix, stats in observed.items():  # per block, but the output logits
            metrics.update({(f"{prefix}/{name}" if prefix == LOGITS else family(prefix, name)): v
                            for name, v in stats.items()})
        if activations:
            metrics.update({family(ADAM, name): v for name, v in when(
                record, adam_stats, grads, state["opt"], opt).items()})
        if attention:
            rms = when(record, grad_rms, grads)
            metrics.update({family(GRAD_RMS): rms[BLOCK], GRAD_RMS: rms["all"]})
        diverged = state["diverged_step"]
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        diverged = jnp.where((diverged < 0) & ~finite, step, diverged)
        new_state = {"params": params, "rest": rest, "opt": opt, "step": step + 1,
                     "diverged_step": diverged, "lr": state["lr"]}
        return new_state, metrics

    return jax.jit(jax.vmap(train_step) if vectorized else train_step, donate_argnums=0)


def make_grad_step(graphdef):
    """(params, rest, inputs, targets) -> the gradient of the training loss (batch-statistics
    norms in training mode; nothing is updated): what the gradient studies average."""
    def grad_step(params, rest, inputs_BxT, targets_BxT):
        def loss_of(params):
            model = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, rest))
            return loss_fn(model(inputs_BxT), targets_BxT)
        return jax.grad(loss_of)(params)
    return jax.jit(grad_step)


def make_eval_step(graphdef, vectorized=False):
    """(params, rest, inputs, targets) -> the loss, with batch statistics' running averages."""
    def eval_step(params, rest, inputs_BxT, targets_BxT):
        model = evaluation_view(nnx.merge(graphdef, params, rest))
        return loss_fn(model(inputs_BxT), targets_BxT)
    return jax.jit(jax.vmap(eval_step) if vectorized else eval_step)
