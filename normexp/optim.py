"""AdamW with linear warmup then cosine decay, and optional global-norm clipping (optax)."""

import jax
import optax


def schedule(cfg, total_steps):
    """0 -> lr linearly over warmup_steps, then cosine down to lr * min_lr_ratio at the end."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params):
    """Weight decay on matrices and embeddings only: norms' gains and biases are not shrunk."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg, total_steps):
    """The optax transform; its state's `hyperparams['learning_rate']` is the lr of the update."""
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=schedule(cfg, total_steps), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return optax.chain(optax.identity(), adamw)


def learning_rate(opt_state):
    return opt_state[1].hyperparams["learning_rate"]
