"""Training runs: the loop around the pure step of normexp.step.

`run(cfg)` trains one run; `run_group(cfgs)` trains runs that differ only in seed, peak
learning rate and DyT's alpha inits (config.GROUP_KEYS) together, one `jax.vmap`-ed step over
their stacked states (a sweep's `vectorize: seeds`), each writing the run directory `normexp
train` would have written for it. The loop (`_loop`) reads top to bottom as its phases:
evaluate, step, log, stop, checkpoint, and at the end finish.

Why the group path is isolated rather than a single run being a group of one: a single run
then compiles exactly the step in normexp.step, with no run axis of size one, so what a user
reads is what runs and its numbers do not depend on how XLA treats a vmap of one. Everything
that differs for a group is in its lanes (normexp.lanes: `Single`, `Group`): how states stack,
how batches join and how fetched values split per run. The loop never asks which it has.
"""

import contextlib
import os
import signal
import sys
import time

import jax
from flax import nnx

from normexp import allocator, budget, hardware, locks, rundir
from normexp import config as config_lib
from normexp import data as data_lib
from normexp.checkpoint import Checkpoints, resume_step
from normexp.console import Console
from normexp.lanes import Group, Single
from normexp.errors import LostProcessError, StorageError, UsageError
from normexp.metric_names import GRAD_NORM, LOSS, VAL_LOSS, due
from normexp.metrics import per_block
from normexp.model import norm_report
from normexp.parallel import Devices, is_primary, lost_message, lost_peer
from normexp.rundir import (COMPLETED, DIVERGED, FAILED, FINISHED, INTERRUPTED, RUNNING,
                            Summary)
from normexp.spikes import spike_scores
from normexp.step import init_state, make_eval_step, make_train_step
from normexp.stop import StopRequests
from normexp.tracking import Tracker, require_wandb


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


def run(cfg, *, resume=False, overwrite=False, missing_ok=True):
    """Train one run as configured; returns its summary (also written to summary.json).

    SIGINT and SIGTERM are turned into a clean stop (checkpoint, status `interrupted`) from
    here on, so a signal during compilation is handled like one during training.
    """
    return run_group([cfg], resume=resume, overwrite=overwrite, missing_ok=missing_ok)[0]


def check_group(cfgs):
    """Runs may train as one vectorized group only if they differ in GROUP_KEYS alone."""
    keys = config_lib.GROUP_KEYS
    for other in cfgs[1:]:
        differ = [k for k in config_lib.differences(cfgs[0], other) if k not in keys]
        if differ:
            raise UsageError(f"runs {cfgs[0].run.name!r} and {other.run.name!r} cannot train as "
                             f"one vectorized group: they differ in {', '.join(differ)} (only "
                             f"{', '.join(keys[:-2])} may differ)")


class Member:
    """One run of a group: its config, directory, writers, and where it stands."""

    def __init__(self, cfg, *, resume, overwrite, missing_ok):
        self.cfg = cfg
        self.dir = rundir.prepare(cfg, resume=resume, overwrite=overwrite, missing_ok=missing_ok)
        self.summary = rundir.read_summary(self.dir) if resume else None
        self.finished = self.summary is not None and self.summary.status in FINISHED
        # what ended the earlier attempts (interrupted, failed, a worker killed): kept
        self.history = self.summary.history if self.summary else ()
        if self.summary and not self.finished:
            self.history += (self.summary.attempt(),)
        self.status = None  # set when the run stops: diverged, interrupted, completed
        self.best = self.last_val = None
        self.last_step = None
        self.tracker = self.checkpoints = None
        self.series = []  # step, loss and gradient norm of every log step: the spike scores

    def start(self, summary, start_step):
        """Mark the run running (`summary`, which this run completes) and open its writers at
        `start_step`."""
        self.summary = summary.replace(run_dir=os.path.abspath(self.dir), history=self.history)
        self.write_summary()
        self.tracker = Tracker(self.dir, start_step=start_step,
                               tensorboard=self.cfg.log.tensorboard, enabled=is_primary(),
                               wandb=self.cfg.log.wandb, name=self.cfg.run.name,
                               config=config_lib.flatten(self.cfg))
        self.tracker.hparams(config_lib.flatten(self.cfg))
        self.best = min((r[VAL_LOSS] for r in self.tracker.kept
                         if r.get(VAL_LOSS) is not None), default=None)
        for record in self.tracker.kept:
            self.logged(record)

    def logged(self, record):
        """Keep what the spike scores read of a record the run logged."""
        if LOSS in record:
            self.series.append({k: record[k] for k in ("step", LOSS, GRAD_NORM) if k in record})

    def evaluated(self, loss):
        self.last_val = float(loss)
        self.best = self.last_val if self.best is None else min(self.best, self.last_val)

    def stop(self, status, step):
        self.status, self.last_step = status, step

    def write_summary(self):
        rundir.write_summary(self.dir, self.summary)

    def fail(self, error):
        self.summary = (self.summary or Summary(FAILED)).replace(
            status=FAILED, error=str(error), run_dir=os.path.abspath(self.dir))

    def close(self):
        """Close the writers once, ending TensorBoard's session with the run's status; a run
        that the disk failed is closed as well as the disk allows."""
        writers, self.tracker, self.checkpoints = (self.tracker, self.checkpoints), None, None
        try:
            if writers[0] is not None and self.summary:
                writers[0].end_session(self.summary.status)
            for writer in writers:
                if writer is not None:
                    writer.close()
        except OSError:
            if self.summary is None or self.summary.status != FAILED:
                raise


def run_group(cfgs, *, resume=False, overwrite=False, missing_ok=True, stop=None, locked=False):
    """Train runs that differ only in seed and lr; one run trains alone, several vectorized.

    Returns their summaries in order. Finished runs (completed or diverged) are not retrained
    under `resume`; the others continue together from the last checkpoint they all have (a run
    that does not exist yet starts, unless `missing_ok` is false). A config that cannot fit in
    memory is refused before anything is written. A failing disk ends the runs as `failed` (in
    summary.json if it can still be written) and raises StorageError; they resume cleanly.

    The runs' locks are held throughout (`locked`: the caller holds them already); a run that
    another live process trains is refused (BusyError). `stop`: the caller's StopRequests, for
    a sweep that must still see a signal that lands after the last step.
    """
    check_group(cfgs)
    cfg = cfgs[0]
    corpus = data_lib.corpus_of(cfg.data)
    budget.check(cfg, corpus.vocab_size, runs=len(cfgs),
                 devices=jax.device_count() if cfg.train.data_parallel == "auto" else 1)
    chosen = hardware.choices(cfg)  # a forced kernel that cannot run here is refused now
    require_wandb(cfg.log.wandb)
    if cfg.train.compile_cache:
        enable_compile_cache(cfg.train.compile_cache)
    members = []
    held = [] if locked or not is_primary() else locks.take_all([c.run.dir for c in cfgs])
    with contextlib.ExitStack() as scope:
        scope.callback(locks.release_all, held)
        stop = stop or scope.enter_context(StopRequests())
        try:
            for c in cfgs:
                members.append(Member(c, resume=resume, overwrite=overwrite,
                                      missing_ok=missing_ok))
            for m in members:
                if m.finished:
                    print(f"{m.dir}: already {m.summary.status}; nothing to do",
                          file=sys.stderr)
            todo = [m for m in members if not m.finished]
            if todo:
                try:
                    _train(todo, corpus, stop, chosen, resume=resume)
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


def _train(members, corpus, stop, chosen, *, resume):
    """Initialise or restore the members' states, start their records, then run the loop.
    `chosen`: what normexp.hardware chose for this device."""
    cfg = members[0].cfg
    lanes = Group(len(members)) if len(members) > 1 else Single()
    B, T = cfg.train.batch_size, cfg.data.seq_len
    states = []
    for m in members:
        graphdef, tx, state = init_state(m.cfg, corpus.vocab_size, kernels=chosen)
        m.checkpoints = Checkpoints(os.path.join(m.dir, "checkpoints"),
                                    cfg.train.keep_checkpoints, primary=is_primary(),
                                    background=chosen["async_checkpoints"].value)
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
    count = jax.device_count()
    if lanes.vectorized and cfg.train.data_parallel == "auto" and jax.process_count() == 1:
        count = budget.devices_needed(cfg, corpus.vocab_size, len(members), count)
    devices = Devices(cfg.train.data_parallel, B, batch_axis=int(lanes.vectorized), count=count)
    console = Console(cfg, start, len(members))
    if is_primary():
        console.starting(states[0]["params"], devices.count, jax.devices()[0].device_kind,
                         chosen, allocator.active())
    for m in members:
        m.start(Summary(RUNNING, steps=start, resumed_at=start or None, norms=norms,
                        data_fingerprint=corpus.fingerprint,
                        vectorized_runs=len(members), devices=devices.count,
                        versions=rundir.versions(), allocator=allocator.active(),
                        hardware=hardware.describe(chosen)), start)
    seeds = [m.cfg.run.seed for m in members]
    val_batches = [devices.batch(lanes.join([b[i] for b in (data_lib.eval_batches(
        corpus.val, seed=seed, count=cfg.data.eval_batches, batch_size=B, seq_len=T)
        for seed in seeds)])) for i in range(cfg.data.eval_batches)]
    batches = data_lib.Prefetcher(lambda step: lanes.join([data_lib.batch(
        corpus.train, seed=seed, step=step, batch_size=B, seq_len=T) for seed in seeds]),
        start=start, put=devices.batch)
    try:
        _loop(members, lanes, graphdef, tx, devices.state(lanes.stack(states)), start, stop,
              batches=batches, val_batches=val_batches, console=console)
    finally:
        batches.close()


class Clock:
    """Training seconds: wall time since `start()` less what ran `paused()` (evaluations and
    checkpoints, which tokens/s does not count)."""

    def start(self):
        self.t0, self.excluded = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def paused(self, state):
        """Not counted: what runs inside, once the device has finished `state`."""
        jax.block_until_ready(state)
        t = time.perf_counter()
        yield
        self.excluded += time.perf_counter() - t

    def seconds(self):
        return time.perf_counter() - self.t0 - self.excluded


def _loop(members, lanes, graphdef, tx, state, start, stop, *, batches, val_batches, console):
    """Compile, then train from `start` to the end, a stop request, or every run diverging.

    Each step runs these phases in order: evaluate (the state before the step, every
    train.eval_every steps), step, log (read the step's metrics, every log.every steps), stop
    (read the stop request), checkpoint (the state after the step, every
    train.checkpoint_every steps or on a stop); `finish` then writes every run's summary.
    """
    cfg = members[0].cfg
    steps, tokens_per_step = cfg.train.steps, cfg.train.batch_size * cfg.data.seq_len
    inputs, targets = next(batches)
    t0 = time.perf_counter()
    step_fn = make_train_step(
        graphdef, tx, grad_norms=cfg.log.grad_norms, activations=cfg.log.activations,
        attention=cfg.log.attention, log=(cfg.log.every, steps), z_loss=cfg.optim.z_loss,
        vectorized=lanes.vectorized).lower(state, inputs, targets).compile()
    eval_fn = make_eval_step(graphdef, lanes.vectorized).lower(
        state["params"], state["rest"], *val_batches[0]).compile()
    compile_seconds = time.perf_counter() - t0
    console.compiled(compile_seconds)
    clock = Clock()

    def evaluate():  # every run's val loss
        total = sum(eval_fn(state["params"], state["rest"], *b) for b in val_batches)
        return [loss / len(val_batches) for loss in lanes.rows(jax.device_get(total))]

    def log(s, metrics, records):  # the one host read of the step's metrics
        fetched, diverged_at = jax.device_get((metrics, state["diverged_step"]))
        for m, row, at in zip(members, lanes.rows(fetched), lanes.rows(diverged_at)):
            if m.status is None:
                records[id(m)].update(per_block(row))
                if at >= 0:
                    m.stop(DIVERGED, s)
                    m.summary = m.summary.replace(diverged_step=int(at))
        console.logged(records, s + 1, (s + 1 - start) * tokens_per_step / max(
            clock.seconds(), 1e-9))

    def checkpoint(t):  # the state after t steps
        for i, m in enumerate(members):
            if m.status in (None, INTERRUPTED):
                m.checkpoints.save(t, lanes.row(state, i))

    s = start - 1  # the last step run (none yet)
    clock.start()
    try:
        for s in range(start, steps):
            records = {id(m): {} for m in members if m.status is None}
            if due(s, cfg.train.eval_every, steps):
                with clock.paused(state):
                    for m, loss in zip(members, evaluate()):
                        if m.status is None:
                            m.evaluated(loss)
                            records[id(m)][VAL_LOSS] = m.last_val
            state, metrics = step_fn(state, inputs, targets)
            if s + 1 < steps:
                inputs, targets = next(batches)  # sampled and transferred while step s ran
            log_step = due(s, cfg.log.every, steps - 1)
            if log_step:
                log(s, metrics, records)
            for m in members:
                if records.get(id(m)):
                    m.tracker.log(s, records[id(m)])
                    m.logged({"step": s, **records[id(m)]})
            if all(m.status is not None for m in members):
                break  # every run diverged
            signum = stop.decide(log_step)  # the one reading of the stop request at this step
            for m in members:
                if signum is not None and m.status is None:
                    m.stop(INTERRUPTED, s)
                    m.summary = m.summary.replace(signal=signal.Signals(signum).name)
            if signum is not None or due(s + 1, cfg.train.checkpoint_every, steps):
                with clock.paused(state):
                    checkpoint(s + 1)
            if signum is not None:
                break
        jax.block_until_ready(state)
        seconds = clock.seconds()
        console.close()
        _finish(members, s, start, evaluate, compile_seconds, tokens_per_s=lambda done: (
            done * tokens_per_step / seconds if seconds > 0 and done > 0 else None))
    except (jax.errors.JaxRuntimeError, ValueError) as e:  # in a collective, if lost_peer
        if not lost_peer(e):
            raise
        console.close()
        _lost(members, e, s, start, compile_seconds)


def _lost(members, error, s, start, compile_seconds):
    """Another process of the job has gone (noticed at step `s`): record the runs as
    interrupted at their last recorded checkpoint (any survivor writes the record: process 0
    may be the one lost) and raise LostProcessError."""
    # a save in flight waits for the lost process: abandoned, and --resume sets it aside
    saved = min(max(m.checkpoints.intact, default=0) for m in members)
    message = lost_message(error, max(s, start), saved)
    for m in members:
        m.checkpoints = None
        if m.status == DIVERGED:  # before the loss: a result, recorded as `_finish` would
            _ended(m, start, compile_seconds, tokens_per_s=lambda done: None)
        else:
            m.summary = m.summary.replace(status=INTERRUPTED, steps=saved, signal=None,
                                          error=message)
        rundir.write_summary(m.dir, m.summary, any_process=True)
    raise LostProcessError(message)


def _finish(members, s, start, evaluate, compile_seconds, tokens_per_s):
    """The final evaluation of the runs that trained to the end, and every run's summary."""
    final = None
    for i, m in enumerate(members):
        if m.status is None:
            m.stop(COMPLETED, s)
            final = evaluate() if final is None else final
            m.evaluated(final[i])
            m.tracker.log(m.cfg.train.steps, {VAL_LOSS: m.last_val})
        _ended(m, start, compile_seconds, tokens_per_s)


def _ended(m, start, compile_seconds, tokens_per_s):
    """The summary of a run that has stopped (`m.status`), from what its loop measured."""
    m.summary = m.summary.replace(
        status=m.status, steps=m.last_step + 1, compile_seconds=compile_seconds,
        final_val_loss=rundir.finite_or_none(m.last_val) if m.status == COMPLETED else None,
        best_val_loss=rundir.finite_or_none(m.best) if m.best is not None else None,
        tokens_per_s=tokens_per_s(m.last_step + 1 - start),
        **spike_scores(m.series, sigma=m.cfg.log.spike_sigma, window=m.cfg.log.spike_window))

