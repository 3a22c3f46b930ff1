"""The train step (one pure function, compiled once per run) and the loop around it.

The state is a plain pytree `{params, rest, opt, step, diverged_step, lr}`; `rest` holds any
non-parameter model state (none for LayerNorm/RMSNorm) and `lr` the run's peak learning rate.
The host reads device values only at log, eval and checkpoint steps; divergence is tracked on
the device so that the first non-finite step is known exactly even though it is only looked at
when logging.

A *group* is several runs that differ only in seed and peak learning rate: `run_group` stacks
their states and trains them together with one `jax.vmap`-ed step (a sweep's `vectorize:
seeds`), each writing the run directory that `normexp train` would have written for it.
"""

import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from normexp import allocator, budget, rundir
from normexp import config as config_lib
from normexp import data as data_lib
from normexp.checkpoint import Checkpoints, resume_step
from normexp.errors import StorageError, UsageError
from normexp.metrics import layer_stats, per_block
from normexp.model import evaluation_view, loss_fn, make_model, norm_report
from normexp.optim import learning_rate, make_optimizer
from normexp.parallel import Devices, is_primary
from normexp.stop import StopRequests
from normexp.tracking import Tracker, finite_or_none, read_json

# What may differ between the runs of one vectorized group: everything else shapes the program.
GROUP_KEYS = ("run.seed", "optim.lr", "run.name", "run.out_dir")


def init_state(cfg, vocab_size):
    """(graphdef, optimizer, state) for a fresh run."""
    model = make_model(cfg.model, vocab_size=vocab_size, max_len=cfg.data.seq_len,
                       seed=cfg.run.seed, remat=cfg.train.remat_policy if cfg.train.remat else None)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    state = {"params": params, "rest": rest, "opt": tx.init(params),
             "step": jnp.zeros((), jnp.int32), "diverged_step": jnp.full((), -1, jnp.int32),
             "lr": jnp.asarray(cfg.optim.lr, jnp.float32)}
    return graphdef, tx, state


def make_train_step(graphdef, tx, *, grad_norms, activations=None, vectorized=False):
    """(state, inputs, targets) -> (state, metrics): forward, backward, statistics, update.

    activations: (every, steps) to compute the blocks' activation statistics (`act/block/...`)
    at the steps the loop logs (multiples of `every` and the last), zeros at the others.
    vectorized: every argument has a leading axis of runs, trained independently (jax.vmap).
    """

    def train_step(state, inputs_BxT, targets_BxT):
        step = state["step"]

        def loss_of(params):
            # fresh Variables of this trace, so batch-statistics norms may update them here
            model = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, state["rest"]))
            if activations is None:
                logits, acts = model(inputs_BxT), {}
            else:
                every, steps = activations
                logits, acts = model(inputs_BxT, record=(step % every == 0) | (step == steps - 1))
            rest = nnx.state(model, nnx.Not(nnx.Param))
            return loss_fn(logits, targets_BxT), (rest, acts)

        (loss, (rest, acts)), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        updates = jax.tree.map(lambda u: u * state["lr"], updates)  # tx runs at peak lr 1
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)  # before clipping, which happens inside tx
        metrics = {"loss": loss, "lr": learning_rate(opt, state["lr"]), "grad_norm": grad_norm}
        if grad_norms:
            metrics.update(layer_stats(state["params"], grads, updates))
        metrics.update({f"act/block/{name}": v for name, v in acts.items()})
        diverged = state["diverged_step"]
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        diverged = jnp.where((diverged < 0) & ~finite, step, diverged)
        new_state = {"params": params, "rest": rest, "opt": opt, "step": step + 1,
                     "diverged_step": diverged, "lr": state["lr"]}
        return new_state, metrics

    return jax.jit(jax.vmap(train_step) if vectorized else train_step, donate_argnums=0)


def make_eval_step(graphdef, vectorized=False):
    def eval_step(params, rest, inputs_BxT, targets_BxT):
        model = evaluation_view(nnx.merge(graphdef, params, rest))
        return loss_fn(model(inputs_BxT), targets_BxT)
    return jax.jit(jax.vmap(eval_step) if vectorized else eval_step)


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


def run(cfg, *, resume=False, overwrite=False, missing_ok=True):
    """Train one run as configured; returns its summary (also written to summary.json).

    SIGINT and SIGTERM are turned into a clean stop (checkpoint, status `interrupted`) from
    here on, so a signal during compilation is handled like one during training.
    """
    return run_group([cfg], resume=resume, overwrite=overwrite, missing_ok=missing_ok)[0]


def check_group(cfgs):
    """Runs may train as one vectorized group only if they differ in GROUP_KEYS alone."""
    for other in cfgs[1:]:
        differ = [k for k in config_lib.differences(cfgs[0], other) if k not in GROUP_KEYS]
        if differ:
            raise UsageError(f"runs {cfgs[0].run.name!r} and {other.run.name!r} cannot train as "
                             f"one vectorized group: they differ in {', '.join(differ)} (only "
                             f"{', '.join(GROUP_KEYS[:2])} may differ)")


class Member:
    """One run of a group: its config, directory, writers, and where it stands."""

    def __init__(self, cfg, *, resume, overwrite, missing_ok):
        self.cfg = cfg
        self.dir = rundir.prepare(cfg, resume=resume, overwrite=overwrite, missing_ok=missing_ok)
        previous = read_json(os.path.join(self.dir, "summary.json")) if resume else None
        self.summary = previous
        self.finished = bool(previous) and previous.get("status") in ("completed", "diverged")
        self.status = None  # set when the run stops: diverged, interrupted, completed
        self.best = self.last_val = None
        self.last_step = None
        self.tracker = self.checkpoints = None

    def write_summary(self):
        rundir.write_summary(self.dir, self.summary)

    def fail(self, error):
        self.summary = {**(self.summary or {}), "status": "failed", "error": str(error),
                        "run_dir": os.path.abspath(self.dir)}

    def close(self):
        """Close the writers once, ending TensorBoard's session with the run's status; a run
        that the disk failed is closed as well as the disk allows."""
        writers, self.tracker, self.checkpoints = (self.tracker, self.checkpoints), None, None
        try:
            if writers[0] is not None and self.summary:
                writers[0].end_session(self.summary["status"])
            for writer in writers:
                if writer is not None:
                    writer.close()
        except OSError:
            if (self.summary or {}).get("status") != "failed":
                raise


def run_group(cfgs, *, resume=False, overwrite=False, missing_ok=True):
    """Train runs that differ only in seed and lr; one run trains alone, several vectorized.

    Returns their summaries in order. Finished runs (completed or diverged) are not retrained
    under `resume`; the others continue together from the last checkpoint they all have (a run
    that does not exist yet starts, unless `missing_ok` is false). A config that cannot fit in
    memory is refused before anything is written. A failing disk ends the runs as `failed` (in
    summary.json if it can still be written) and raises StorageError; they resume cleanly.
    """
    check_group(cfgs)
    cfg = cfgs[0]
    corpus = data_lib.load_corpus(cfg.data.path, cfg.data.vocab_size, cfg.data.seq_len)
    budget.check(cfg, corpus.vocab_size, runs=len(cfgs),
                 devices=jax.device_count() if cfg.train.data_parallel == "auto" else 1)
    if cfg.train.compile_cache:
        enable_compile_cache(cfg.train.compile_cache)
    members = []
    with StopRequests() as stop:
        try:
            for c in cfgs:
                members.append(Member(c, resume=resume, overwrite=overwrite,
                                      missing_ok=missing_ok))
            for m in members:
                if m.finished:
                    print(f"{m.dir}: already {m.summary['status']}; nothing to do",
                          file=sys.stderr)
            todo = [m for m in members if not m.finished]
            if todo:
                try:
                    _train(todo, corpus, stop, resume=resume)
                except OSError as e:
                    for m in todo:
                        m.fail(StorageError.from_os(e))
                    raise
                finally:
                    for m in todo:
                        m.close()
                for m in todo:
                    m.write_summary()
        except OSError as e:
            error = StorageError.from_os(e)
            for m in members:
                if not m.finished:
                    m.fail(error)
                    try:
                        m.close()
                        m.write_summary()
                    except OSError:
                        pass  # the disk that failed the run may refuse its summary too
            raise error from None
    return [m.summary for m in members]


def _stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _row(tree, i):
    return jax.tree.map(lambda leaf: leaf[i], tree)


def _train(members, corpus, stop, *, resume):
    """Initialise or restore the members' states, then run the loop over them together."""
    cfg, vectorized = members[0].cfg, len(members) > 1
    B, T = cfg.train.batch_size, cfg.data.seq_len
    states = []
    for m in members:
        graphdef, tx, state = init_state(m.cfg, corpus.vocab_size)
        m.checkpoints = Checkpoints(os.path.join(m.dir, "checkpoints"),
                                    cfg.train.keep_checkpoints, primary=is_primary())
        states.append(state)
    start = resume_step([m.checkpoints for m in members]) if resume else 0
    if start:
        states = [m.checkpoints.restore(start, s) for m, s in zip(members, states)]
    norms = {"kind": cfg.model.norm.kind, "placement": cfg.model.placement,
             **norm_report(nnx.merge(graphdef, states[0]["params"], states[0]["rest"]))}
    if norms["leaks_across_positions"]:
        print(f"warning: model.norm.kind={norms['kind']} pools statistics over positions, so "
              f"each position sees later tokens and the losses are not those of a causal "
              f"model (recorded in summary.json under norms)", file=sys.stderr)
    devices = Devices(cfg.train.data_parallel, B, batch_axis=int(vectorized))
    for m in members:
        m.summary = {"status": "running", "steps": start, "diverged_step": None, "norms": norms,
                     "final_val_loss": None, "best_val_loss": None, "tokens_per_s": None,
                     "compile_seconds": None, "data_fingerprint": corpus.fingerprint,
                     "vectorized_runs": len(members), "devices": devices.count,
                     "versions": rundir.versions(), "allocator": allocator.active(),
                     "run_dir": os.path.abspath(m.dir)}
        m.write_summary()
        m.tracker = Tracker(m.dir, start_step=start, tensorboard=cfg.log.tensorboard,
                            enabled=is_primary())
        m.tracker.hparams(config_lib.flatten(m.cfg))
        val_losses = [r["val_loss"] for r in m.tracker.kept if r.get("val_loss") is not None]
        m.best = min(val_losses, default=None)
    seeds = [m.cfg.run.seed for m in members]

    def together(pairs):  # one (inputs, targets) per member -> the step's arguments
        return tuple(np.stack(x) for x in zip(*pairs)) if vectorized else pairs[0]

    val_batches = [devices.batch(together([b[i] for b in (data_lib.eval_batches(
        corpus.val, seed=seed, count=cfg.data.eval_batches, batch_size=B, seq_len=T)
        for seed in seeds)])) for i in range(cfg.data.eval_batches)]
    batches = data_lib.Prefetcher(lambda step: together([data_lib.batch(
        corpus.train, seed=seed, step=step, batch_size=B, seq_len=T) for seed in seeds]),
        start=start, put=devices.batch)
    state = devices.state(_stack(states) if vectorized else states[0])
    try:
        _loop(members, graphdef, tx, state, start, stop, batches=batches,
              val_batches=val_batches)
    finally:
        batches.close()


def _loop(members, graphdef, tx, state, start, stop, *, batches, val_batches):
    """Compile, then train from `start` to the end, a stop request, or every run diverging."""
    cfg, vectorized = members[0].cfg, len(members) > 1
    steps, T, B = cfg.train.steps, cfg.data.seq_len, cfg.train.batch_size
    inputs, targets = next(batches)
    t0 = time.perf_counter()
    step_fn = make_train_step(graphdef, tx, grad_norms=cfg.log.grad_norms, activations=(
        cfg.log.every, steps) if cfg.log.activations else None,
                              vectorized=vectorized).lower(state, inputs, targets).compile()
    eval_fn = make_eval_step(graphdef, vectorized).lower(
        state["params"], state["rest"], *val_batches[0]).compile()
    compile_seconds = time.perf_counter() - t0

    def evaluate():  # the val loss of every member, as a list
        total = sum(eval_fn(state["params"], state["rest"], *b) for b in val_batches)
        return list(np.atleast_1d(jax.device_get(total)) / len(val_batches))

    def rows(tree):  # fetched host values -> one tree per member
        return [_row(tree, i) for i in range(len(members))] if vectorized else [tree]

    excluded = 0.0  # seconds of evaluation and checkpointing, not counted in tokens/s
    progress = _progress(cfg, start, len(members))
    s = start - 1  # the last step run (none yet)
    t_start = time.perf_counter()
    for s in range(start, steps):
        active = [m for m in members if m.status is None]
        records = {id(m): {} for m in active}
        if s % cfg.train.eval_every == 0:
            jax.block_until_ready(state)
            t = time.perf_counter()
            for m, loss in zip(members, evaluate()):
                if m.status is None:
                    m.last_val = records[id(m)]["val_loss"] = float(loss)
                    m.best = m.last_val if m.best is None else min(m.best, m.last_val)
            excluded += time.perf_counter() - t
        state, metrics = step_fn(state, inputs, targets)
        if s + 1 < steps:
            inputs, targets = next(batches)  # sampled and transferred while step s ran
        if every(s, cfg.log.every, steps):
            fetched, diverged_at = jax.device_get((metrics, state["diverged_step"]))
            for m, row, at in zip(members, rows(fetched), np.atleast_1d(diverged_at)):
                if m.status is None:
                    records[id(m)].update(per_block(row))
                    if at >= 0:
                        m.status, m.summary["diverged_step"], m.last_step = "diverged", int(at), s
            elapsed = time.perf_counter() - t_start - excluded
            losses = [float(r["loss"]) for r in records.values() if "loss" in r]
            progress.set_postfix(loss=f"{np.median(losses):.4f}" if losses else "-",
                                 tok_s=f"{(s + 1 - start) * B * T / max(elapsed, 1e-9):.0f}")
            progress.update(s + 1 - progress.n)
        for m in active:
            if records[id(m)]:
                m.tracker.log(s, records[id(m)])
        if all(m.status is not None for m in members):
            break  # every run diverged
        signum = stop.decide(every(s, cfg.log.every, steps))  # the one reading of this step
        if signum is not None:
            for m in members:
                if m.status is None:
                    m.status, m.last_step, m.summary["signal"] = ("interrupted", s,
                                                                   signal.Signals(signum).name)
        if signum is not None or every(s + 1, cfg.train.checkpoint_every, steps + 1):
            jax.block_until_ready(state)
            t = time.perf_counter()
            for i, m in enumerate(members):
                if m.status in (None, "interrupted"):
                    m.checkpoints.save(s + 1, _row(state, i) if vectorized else state)
            excluded += time.perf_counter() - t
        if signum is not None:
            break
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - t_start - excluded
    progress.close()
    final = None
    for i, m in enumerate(members):
        if m.status is None:
            m.status, m.last_step = "completed", s
            final = evaluate() if final is None else final
            m.last_val = float(final[i])
            m.best = m.last_val if m.best is None else min(m.best, m.last_val)
            m.tracker.log(steps, {"val_loss": m.last_val})
        done = m.last_step + 1 - start
        m.summary.update(
            status=m.status, steps=m.last_step + 1, compile_seconds=compile_seconds,
            final_val_loss=finite_or_none(m.last_val) if m.status == "completed" else None,
            best_val_loss=finite_or_none(m.best) if m.best is not None else None,
            tokens_per_s=done * B * T / elapsed if elapsed > 0 and done > 0 else None)


def _progress(cfg, start, runs):
    from tqdm import tqdm
    desc = cfg.run.name if runs == 1 else f"{runs} runs vectorized"
    hidden = not cfg.log.progress or os.environ.get("NORMEXP_WORKER")  # a sweep's worker
    return tqdm(total=cfg.train.steps, initial=start, disable=bool(hidden),
                desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)
