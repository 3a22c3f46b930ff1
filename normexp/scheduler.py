"""Who trains which run of a sweep, and when a sweep is done.

One rule for every path that trains a run (a sweep in one process, a `--max-parallel` worker,
a shard, `normexp train`): it holds the run's lock (normexp.locks) the whole time, and a
vectorized group's locks are taken all together or not at all. A sweep comes back to the
groups it found held by another process, and it ends only when every run of its share is
accounted for:

    finished    completed or diverged (never trained again), or failed in this invocation
                (a sweep retries a failed run once per invocation, not in a loop)
    held        trained by a live process outside this sweep: waited for (one line names the
                holder), or with `wait=False` the sweep exits 75 naming them and the command
                that finishes them

A stop request (SIGINT, SIGTERM) is read between units as well as inside each run, so one that
arrives while a run writes its final summary still stops the sweep before its next run.
"""

import os
import signal
import sys
import time

from normexp import rundir, workers  # workers imports only the standard library at its top
from normexp.console import end_line
from normexp.errors import EXIT_BUSY, BusyError, StorageError, UsageError
from normexp.locks import RunLock, release_all, take_all
from normexp.rundir import FAILED, FINISHED, INTERRUPTED, status

POLL_SECONDS = 5.0  # how often a sweep waiting on another process looks at its locks again


class Share:
    """This invocation's units of work (a shard's, or the whole sweep's) and where they stand."""

    def __init__(self, units):
        self.units = units
        self.attempted = set()  # runs trained (or tried) by this invocation
        self.summaries = {}
        self.announced = set()  # the holders a waiting sweep has named already
        self.taken_over = set()  # units whose worker died once (normexp.workers)

    def runs(self):
        return [r for u in self.units for r in u]

    def settled(self, run):
        return status(run.cfg.run.dir) in FINISHED or run.name in self.attempted

    def todo(self, unit):
        return [r for r in unit if not self.settled(r)]

    def open_units(self):
        return [u for u in self.units if self.todo(u)]

    def record(self, runs, summaries):
        for r, s in zip(runs, summaries):
            self.attempted.add(r.name)
            self.summaries[r.name] = s

    def done(self):
        return sum(self.settled(r) for r in self.runs())

    def code(self):
        """0, or 1 when a run failed in this invocation."""
        return int(any(s and s.status == FAILED for s in self.summaries.values()))

    def last_line(self, sweep):
        """How many of the share's runs are finished, by status; what holds the others."""
        runs = self.runs()
        counts = {}
        for r in runs:
            if self.settled(r):
                key = status(r.cfg.run.dir)
                counts[key] = counts.get(key, 0) + 1
        line = f"sweep: {self.done()} of {len(runs)} runs finished"
        if counts:
            line += " (" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")"
        left = [r.name for r in runs if not self.settled(r)]
        if left:
            line += (f"; {len(left)} not: {', '.join(left[:4])}{' ...' if len(left) > 4 else ''}"
                     f"; `normexp sweep {sweep.path} --out {sweep.out_dir}` finishes them")
        return line


class View:
    """What a sweep says: a bar on a terminal, plain lines elsewhere (a log file, SLURM)."""

    def __init__(self, share, progress):
        self.share, self.total = share, len(share.runs())
        self.bar = None
        if progress and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=share.done(), desc="sweep", unit="run",
                            dynamic_ncols=True, file=sys.stderr, position=0)

    def say(self, line):
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def ended(self, runs, summaries):
        done = self.share.done()
        for i, (r, s) in enumerate(zip(runs, summaries)):
            self.say(f"[{done - len(runs) + i + 1}/{self.total}] {end_line(s, r.name)}")
        if self.bar is not None:
            self.bar.update(done - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def train_unit(cfgs, stop, say):
    """Train these runs under their locks (BusyError when another process holds one); a crash
    is recorded as `failed` and the sweep goes on; errors that would fail the next run the same
    way (config, storage) are raised."""
    from normexp.train import run_group
    held = take_all([c.run.dir for c in cfgs])
    try:
        for lock in held:
            if lock.stale:
                say(f"{lock.path}: taking over from {lock.stale} (not running)")
        try:
            return run_group(cfgs, resume=True, stop=stop, locked=True)
        except (UsageError, StorageError):
            raise
        except Exception as e:  # a crashed run is recorded; the sweep goes on
            return [rundir.record_failure(c.run.dir, e) for c in cfgs]
    finally:
        release_all(held)


def stopped_code(stop, summaries=()):
    signum = stop.signum or next((signal.Signals[s.signal].value for s in summaries
                                  if s and s.status == INTERRUPTED and s.signal), None)
    return None if signum is None else 128 + signum


def run(sweep, units, *, max_parallel=1, progress=True, wait=True, stop):
    """Train these units (in this process, or in K worker processes) until every run is
    accounted for; returns the exit code: 0; 1 if a run failed; 75 if runs are held
    elsewhere and `wait` is off; 128 + the signal on a stop request. Its last line on stderr
    says how many of the runs are finished."""
    share = Share(units)
    view = View(share, progress)
    try:
        if max_parallel > 1:
            return workers.run_workers(sweep, share, max_parallel, view, stop, wait)
        return _in_process(sweep, share, view, stop, wait)
    finally:
        view.close()
        print(share.last_line(sweep), file=sys.stderr)


def _in_process(sweep, share, view, stop, wait):
    while True:
        for unit in share.open_units():
            if stop.signum:
                break
            todo = share.todo(unit)
            try:
                summaries = train_unit([r.cfg for r in todo], stop, view.say)
            except BusyError:
                continue  # held by another process: come back to it
            share.record(todo, summaries)
            view.ended(todo, summaries)
            if stopped_code(stop, summaries):
                break
        code = stopped_code(stop, share.summaries.values())
        if code is None and share.open_units():
            code = wait_for_holders(sweep, share, view, stop, wait)
            if code is None:
                continue
        return share.code() if code is None else code


def holders(share):
    """{holder: [run names]} of the open units' runs that a live process holds, and whether
    some open unit could be taken now (none of its runs held)."""
    held, ready = {}, False
    for unit in share.open_units():
        busy = False
        for r in share.todo(unit):
            lock = RunLock.of(r.cfg.run.dir)
            if lock.held():
                held.setdefault(lock.holder(), []).append(r.name)
                busy = True
        ready |= not busy
    return held, ready


def wait_for_holders(sweep, share, view, stop, wait):
    """None when there may be work to take again (after waiting, if every open unit was held),
    else the exit code: 75 without `wait`, 128 + signal on a stop request."""
    held, ready = holders(share)
    if ready or not held:
        return None
    if not wait:
        for who, names in held.items():
            view.say(f"{', '.join(names)}: held by {who}; not waiting (--no-wait): once it "
                     f"ends, `normexp sweep {sweep.path} --out {sweep.out_dir}` finishes them")
        return EXIT_BUSY
    for who, names in held.items():
        if (who, tuple(names)) not in share.announced:
            share.announced.add((who, tuple(names)))
            view.say(f"waiting for {who}, which trains {', '.join(names)} (this sweep takes "
                     f"over what it leaves unfinished; --no-wait exits instead)")
    deadline = time.monotonic() + float(os.environ.get("NORMEXP_POLL_SECONDS", POLL_SECONDS))
    while time.monotonic() < deadline and not stop.signum:
        time.sleep(0.2)
    return stopped_code(stop)
