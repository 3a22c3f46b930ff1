"""AdamW with linear warmup then cosine decay, and optional global-norm clipping (optax).

The transform runs at a peak learning rate of 1; the train step multiplies its update by the
run's own peak `lr`, a value in the train state rather than a constant of the program. AdamW's
update, decoupled weight decay included, is linear in the learning rate, so this is the same
update, and runs that differ only in `lr` share one compiled step (a sweep's compile cache, and
`jax.vmap` over learning rates).
"""

import jax
import optax

from normexp.weights import decays, is_variable


def schedule(cfg, total_steps, peak=1.0):
    """0 -> peak linearly over warmup_steps, then cosine down to peak * min_lr_ratio at the end."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1), end_value=peak * cfg.min_lr_ratio)


def decay_mask(params):
    """Weight decay where a parameter declares it (normexp.weights): kernels, embeddings and
    unit-offset gains (toward their offset); biases and plain gains are not shrunk."""
    return jax.tree.map(lambda p: p.replace(decays(p)) if is_variable(p) else False, params,
                        is_leaf=is_variable)


def make_optimizer(cfg, total_steps):
    """The optax transform at peak lr 1; `hyperparams['learning_rate']` is the schedule's factor."""
    # the mask is a function of the params, not a schedule: static, or it would be called with
    # the step count (and mask everything out)
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=schedule(cfg, total_steps), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return optax.chain(optax.identity(), adamw)


def adam_moments(opt_state):
    """(mu, nu, count, b2) of the AdamW inside `make_optimizer`'s state: the first and second
    moment trees, the updates they have seen, and beta2."""
    # chain(clip | identity, inject(adamw)); adamw is a chain whose first state is Adam's
    adam = opt_state[1].inner_state[0]
    return adam.mu, adam.nu, adam.count, opt_state[1].hyperparams["b2"]


def learning_rate(opt_state, peak):
    """The learning rate of the update: the schedule's factor times the run's peak lr."""
    return opt_state[1].hyperparams["learning_rate"] * peak
