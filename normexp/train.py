"""The train step (one pure function, compiled once per run) and the loop around it.

The state is a plain pytree `{params, rest, opt, step, diverged_step}`; `rest` holds any
non-parameter model state (none for LayerNorm/RMSNorm). The host reads device values only at
log, eval and checkpoint steps; divergence is tracked on the device so that the first
non-finite step is known exactly even though it is only looked at when logging.
"""

import json
import os
import platform
import shutil
import signal
import sys
import time
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from normexp import allocator
from normexp import config as config_lib
from normexp import data as data_lib
from normexp.checkpoint import Checkpoints
from normexp.errors import UsageError
from normexp.metrics import layer_stats, per_block
from normexp.model import evaluation_view, loss_fn, make_model, norm_report
from normexp.optim import learning_rate, make_optimizer
from normexp.tracking import Tracker, finite_or_none, write_atomic


def init_state(cfg, vocab_size):
    """(graphdef, optimizer, state) for a fresh run."""
    model = make_model(cfg.model, vocab_size=vocab_size, max_len=cfg.data.seq_len,
                       seed=cfg.run.seed, remat=cfg.train.remat_policy if cfg.train.remat else None)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    state = {"params": params, "rest": rest, "opt": tx.init(params),
             "step": jnp.zeros((), jnp.int32), "diverged_step": jnp.full((), -1, jnp.int32)}
    return graphdef, tx, state


def make_train_step(graphdef, tx, *, grad_norms):
    """(state, inputs, targets) -> (state, metrics): forward, backward, statistics, update."""

    def train_step(state, inputs_BxT, targets_BxT):
        def loss_of(params):
            # fresh Variables of this trace, so batch-statistics norms may update them here
            model = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, state["rest"]))
            loss = loss_fn(model(inputs_BxT), targets_BxT)
            return loss, nnx.state(model, nnx.Not(nnx.Param))

        (loss, rest), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)  # before clipping, which happens inside tx
        metrics = {"loss": loss, "lr": learning_rate(opt), "grad_norm": grad_norm}
        if grad_norms:
            metrics.update(layer_stats(state["params"], grads, updates))
        step, diverged = state["step"], state["diverged_step"]
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        diverged = jnp.where((diverged < 0) & ~finite, step, diverged)
        new_state = {"params": params, "rest": rest, "opt": opt, "step": step + 1,
                     "diverged_step": diverged}
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(graphdef):
    def eval_step(params, rest, inputs_BxT, targets_BxT):
        model = evaluation_view(nnx.merge(graphdef, params, rest))
        return loss_fn(model(inputs_BxT), targets_BxT)
    return jax.jit(eval_step)


def enable_compile_cache(directory):
    """Persist compiled executables under `directory`, whatever their size or compile time."""
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # jax settles on a cache at its first compile: start over so this directory is used even
    # when this process (a notebook, a sweep) has compiled before.
    from jax.experimental.compilation_cache import compilation_cache
    compilation_cache.reset_cache()


def every(step, n, total):
    """True at multiples of n and at the last step: the one cadence helper of the loop."""
    return step % n == 0 or step == total - 1


def versions():
    names = ["normexp", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"]
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def prepare_run_dir(cfg, *, resume, overwrite):
    """Create (or check, for --resume) the run directory; nothing is replaced silently."""
    run_dir = cfg.run.dir
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other: continue the run or "
                         "replace it")
    saved = os.path.join(run_dir, "config.yaml")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UsageError(f"run.out_dir: {run_dir!r} is a file, not a directory")
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        is_run = os.path.isfile(saved)
        if not is_run:
            raise UsageError(f"{run_dir}: exists and is not a normexp run (no config.yaml); "
                             f"refusing to {'resume' if resume else 'replace'} it, choose "
                             f"another run.name or run.out_dir")
        if overwrite:
            shutil.rmtree(run_dir)
        elif resume:
            differ = config_lib.differences(config_lib.load(saved), cfg)
            if differ:
                raise UsageError(f"{run_dir}: --resume with a config that differs from the "
                                 f"run's config.yaml in {', '.join(differ)}; pass {saved} "
                                 f"to continue it as it was")
        else:
            raise UsageError(f"{run_dir}: already exists; pass --resume to continue it or "
                             f"--overwrite to replace it")
    os.makedirs(run_dir, exist_ok=True)
    write_atomic(saved, config_lib.to_yaml(cfg))
    return run_dir


class _StopRequests:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self.previous[signum])  # a second signal acts at once

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def run(cfg, *, resume=False, overwrite=False):
    """Train one run as configured; returns its summary (also written to summary.json).

    SIGINT and SIGTERM are turned into a clean stop (checkpoint, status `interrupted`) from
    here on, so a signal during compilation is handled like one during training.
    """
    corpus = data_lib.load_corpus(cfg.data.path, cfg.data.vocab_size, cfg.data.seq_len)
    if cfg.train.compile_cache:
        enable_compile_cache(cfg.train.compile_cache)
    with _StopRequests() as stop:
        run_dir = prepare_run_dir(cfg, resume=resume, overwrite=overwrite)
        summary_path = os.path.join(run_dir, "summary.json")
        previous = _read_json(summary_path) if resume else None
        if previous and previous.get("status") in ("completed", "diverged"):
            print(f"{run_dir}: already {previous['status']}; nothing to do", file=sys.stderr)
            return previous
        graphdef, tx, state = init_state(cfg, corpus.vocab_size)
        checkpoints = Checkpoints(os.path.join(run_dir, "checkpoints"),
                                  cfg.train.keep_checkpoints)
        start = 0
        if resume and checkpoints.latest_step() is not None:
            start = checkpoints.latest_step()
            state = checkpoints.restore(start, state)
        norms = {"kind": cfg.model.norm.kind, "placement": cfg.model.placement,
                 **norm_report(nnx.merge(graphdef, state["params"], state["rest"]))}
        if norms["leaks_across_positions"]:
            print(f"warning: model.norm.kind={norms['kind']} pools statistics over positions, so "
                  f"each position sees later tokens and the losses are not those of a causal "
                  f"model (recorded in summary.json under norms)", file=sys.stderr)
        summary = {"status": "running", "steps": start, "diverged_step": None, "norms": norms,
                   "final_val_loss": None, "best_val_loss": None, "tokens_per_s": None,
                   "compile_seconds": None, "data_fingerprint": corpus.fingerprint,
                   "versions": versions(), "allocator": allocator.active(),
                   "run_dir": os.path.abspath(run_dir)}
        write_atomic(summary_path, _json(summary))
        tracker = Tracker(run_dir, start_step=start, tensorboard=cfg.log.tensorboard)
        B, T, seed = cfg.train.batch_size, cfg.data.seq_len, cfg.run.seed
        val_batches = [jax.device_put(b) for b in data_lib.eval_batches(
            corpus.val, seed=seed, count=cfg.data.eval_batches, batch_size=B, seq_len=T)]
        batches = data_lib.Prefetcher(corpus.train, seed=seed, start=start, batch_size=B,
                                      seq_len=T)
        try:
            summary = _loop(cfg, graphdef, tx, state, start, summary, stop, batches=batches,
                            val_batches=val_batches, checkpoints=checkpoints, tracker=tracker)
        finally:
            batches.close()
            tracker.close()
            checkpoints.close()
        write_atomic(summary_path, _json(summary))
    return summary


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _loop(cfg, graphdef, tx, state, start, summary, stop, *, batches, val_batches, checkpoints,
          tracker):
    """Compile, then train from `start` to the end, a divergence or a stop request."""
    steps, T, B = cfg.train.steps, cfg.data.seq_len, cfg.train.batch_size
    inputs, targets = next(batches)
    t0 = time.perf_counter()
    step_fn = make_train_step(graphdef, tx, grad_norms=cfg.log.grad_norms).lower(
        state, inputs, targets).compile()
    eval_fn = make_eval_step(graphdef).lower(state["params"], state["rest"],
                                             *val_batches[0]).compile()
    summary["compile_seconds"] = time.perf_counter() - t0

    def evaluate():
        total = sum(eval_fn(state["params"], state["rest"], *b) for b in val_batches)
        return float(total) / len(val_batches)

    val_losses = [r["val_loss"] for r in tracker.kept if r.get("val_loss") is not None]
    best = min(val_losses, default=None)
    last_val = None
    excluded = 0.0  # seconds of evaluation and checkpointing, not counted in tokens/s
    progress = _progress(cfg, start)
    status, s = "completed", start - 1  # s: the last step run (none yet)
    t_start = time.perf_counter()
    for s in range(start, steps):
        record = {}
        if s % cfg.train.eval_every == 0:
            jax.block_until_ready(state)
            t = time.perf_counter()
            last_val = record["val_loss"] = evaluate()
            best = last_val if best is None else min(best, last_val)
            excluded += time.perf_counter() - t
        state, metrics = step_fn(state, inputs, targets)
        if s + 1 < steps:
            inputs, targets = next(batches)  # sampled and transferred while step s ran
        if every(s, cfg.log.every, steps):
            fetched, diverged_at = jax.device_get((metrics, state["diverged_step"]))
            fetched = per_block(fetched)
            record.update(fetched)
            elapsed = time.perf_counter() - t_start - excluded
            progress.set_postfix(loss=f"{float(fetched['loss']):.4f}",
                                 tok_s=f"{(s + 1 - start) * B * T / max(elapsed, 1e-9):.0f}")
            progress.update(s + 1 - progress.n)
            if diverged_at >= 0:
                status, summary["diverged_step"] = "diverged", int(diverged_at)
        if record:
            tracker.log(s, record)
        if status == "diverged":
            break
        if stop.signum is not None:
            status = "interrupted"
        if status == "interrupted" or every(s + 1, cfg.train.checkpoint_every, steps + 1):
            jax.block_until_ready(state)
            t = time.perf_counter()
            checkpoints.save(s + 1, state)
            excluded += time.perf_counter() - t
        if status == "interrupted":
            break
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - t_start - excluded
    progress.close()
    done = s + 1 - start
    if status == "completed":
        last_val = evaluate()
        best = last_val if best is None else min(best, last_val)
        tracker.log(steps, {"val_loss": last_val})
    summary.update(
        status=status, steps=s + 1,
        final_val_loss=finite_or_none(last_val) if status == "completed" else None,
        best_val_loss=finite_or_none(best) if best is not None else None,
        tokens_per_s=done * B * T / elapsed if elapsed > 0 else None)
    if status == "interrupted":
        summary["signal"] = signal.Signals(stop.signum).name
    return summary


def _progress(cfg, start):
    from tqdm import tqdm
    return tqdm(total=cfg.train.steps, initial=start, disable=not cfg.log.progress,
                desc=cfg.run.name, unit="step", dynamic_ncols=True, file=sys.stderr)


def _json(obj):
    return json.dumps(obj, indent=1, default=_to_builtin) + "\n"


def _to_builtin(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
