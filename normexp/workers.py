"""`normexp sweep --max-parallel K`: K worker processes, each on its own share of the cores
and of the host's GPUs.

The parent (`run_workers`) hands out the units of work, one at a time, to workers that ask for
none themselves: each is a `normexp sweep --worker` that reads a unit's configs from its stdin
(so it never reads the sweep file, which may have changed since) and answers on a pipe of its
own. So no two workers ever hold parts of one group, and the parent knows which run each
worker trains: a worker that dies is named with its run, which is recorded as failed and handed
once to another worker. SIGINT and SIGTERM to the parent reach every worker, and a worker
whose parent dies gets SIGTERM from the kernel (PR_SET_PDEATHSIG); either way its run stops
at the next step with a checkpoint, `interrupted`.

A worker pins itself (`pin`) before it imports anything that starts a thread pool. This module
imports only the standard library at the top, so that `normexp.cli` can pin a worker first;
the parent never starts jax, so it holds no accelerator memory while its workers train.
"""

import collections
import ctypes
import glob
import json
import os
import selectors
import signal
import subprocess
import sys


def pin():
    """In a worker, before anything starts a thread pool (numpy's BLAS, XLA): keep to the
    cores the parent chose (NORMEXP_CORES, from `worker_cores`)."""
    cores = os.environ.get("NORMEXP_CORES")
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cores.split(",")})


def worker_cores(k):
    """Disjoint sets of this process's CPU cores for k workers (None: leave them unpinned).

    XLA:CPU sizes its thread pool to the cores a process may use. A small model's step scales
    poorly over threads, so on a 2-core CPU two workers on one core each train 1.3x the runs
    per hour of one process on both (scripts/bench_sweep.py, see the README).
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < k:
        return [None] * k
    return [set(cpus[i * len(cpus) // k:(i + 1) * len(cpus) // k]) for i in range(k)]


def visible_gpus():
    """This host's NVIDIA GPUs as CUDA_VISIBLE_DEVICES entries, found without starting jax:
    the entries of CUDA_VISIBLE_DEVICES when it is set, else /dev/nvidia0, /dev/nvidia1, ..."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d.strip() for d in given.split(",") if d.strip() and d.strip() != "-1"]
    found = [p[len("/dev/nvidia"):] for p in glob.glob("/dev/nvidia*")]
    return sorted((d for d in found if d.isdigit()), key=int)


def worker_gpus(k, gpus):
    """Each of k workers' share of the GPUs, as (its GPUs, how many workers share them).

    With at least as many GPUs as workers each worker gets its own contiguous slice (one GPU
    per worker when k equals the count); with more workers than GPUs, worker i shares GPU
    i mod n with the others that land there, and each may take its part of the memory."""
    n = len(gpus)
    if n == 0:  # none found (a CPU host, or an accelerator that is not an NVIDIA GPU): shared
        return [([], k)] * k
    if k <= n:
        return [(gpus[i * n // k:(i + 1) * n // k], 1) for i in range(k)]
    return [([gpus[i % n]], k // n + (i % n < k % n)) for i in range(k)]


def worker_env(cores, gpus, sharers):
    """The environment a worker adds: its cores (NORMEXP_CORES, for `pin`), its GPUs and its
    share of their memory (0.9 / the workers sharing them, jax's preallocation otherwise)."""
    env = {"NORMEXP_CORES": ",".join(map(str, sorted(cores))) if cores else ""}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    if sharers > 1 and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / sharers:.3f}"
    return env


class Worker:
    """One worker process, the unit it trains (None when idle) and its report pipe."""

    def __init__(self, number, args, env):
        self.number, self.unit = number, None
        read, write = os.pipe()
        self.proc = subprocess.Popen(args, env=dict(env, NORMEXP_REPORT_FD=str(write)),
                                     stdin=subprocess.PIPE, pass_fds=(write,), text=True)
        os.close(write)
        self.reports = os.fdopen(read)
        self.name = f"worker {number} (pid {self.proc.pid})"

    def give(self, unit):
        """Send the unit's configs (the first whole, the others as their differences from
        it); False if the worker is gone."""
        try:
            self.proc.stdin.write(encode([r.cfg for r in unit]))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        self.unit = unit
        return True

    def stop(self, signum):
        """Stop now (signum: the run checkpoints, `interrupted`) or, with None, after the
        current unit."""
        if signum and self.proc.poll() is None:
            self.proc.send_signal(signum)
        self.finish()

    def finish(self):
        """No more work: the worker exits once its current unit is done."""
        if not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass


def encode(cfgs):
    """A unit's configs as one line: the first whole (YAML), the others as what differs."""
    from normexp.config import differences, flatten, to_yaml
    flat = [flatten(c) for c in cfgs]
    return json.dumps({"config": to_yaml(cfgs[0]), "runs": [
        {k: f[k] for k in differences(cfgs[0], c)} for c, f in zip(cfgs, flat)]}) + "\n"


def decode(line):
    """The configs of a line that `encode` wrote."""
    import yaml
    from normexp.config import build
    job = json.loads(line)
    raw = yaml.safe_load(job["config"])
    return [build(raw, list(changes.items())) for changes in job["runs"]]


def _death(code):
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def worker_slots(k):
    """The environment of each of k workers: its cores, its GPUs, and its parent."""
    env = dict(os.environ, NORMEXP_WORKER="1", NORMEXP_PARENT=str(os.getpid()))
    return [dict(env, **worker_env(cores, *gpus))
            for cores, gpus in zip(worker_cores(k), worker_gpus(k, visible_gpus()))]


def run_workers(sweep, share, k, view, stop, wait):
    """Train the share's open units in K worker processes; returns the exit code as
    scheduler.run_units does."""
    from normexp.errors import StorageError, UsageError
    from normexp.rundir import Summary
    from normexp.scheduler import stopped_code, wait_for_holders
    queue = collections.deque(share.open_units())
    k = max(1, min(k, len(queue)))  # an idle worker would keep its cores idle too
    args = [sys.executable, "-m", "normexp.cli", "sweep", sweep.path, "--worker"]
    pool = Pool(worker_slots(k), args)
    fatal, stopping, code = None, False, None
    try:
        while True:
            if (stop.signum or fatal) and not stopping:
                stopping = True
                pool.stop(signal.SIGTERM if stop.signum else None)
            if not stopping:
                for w in pool.idle():
                    if queue and w.give(queue[0]):
                        queue.popleft()
            if not pool.busy():
                if stopping or not share.open_units():
                    break
                if not queue:  # what is left is held by processes outside the sweep
                    code = wait_for_holders(sweep, share, view, stop, wait)
                    if code is not None:
                        break
                    queue.extend(share.open_units())
                    continue
                if not pool.alive():
                    pool.start(0)  # never leave work with no worker to do it
            for w, report in pool.reports():
                unit, w.unit = w.unit, None
                if report is None:  # the worker is gone
                    died = w.proc.returncode
                    if unit is not None:
                        taken = _died_training(w, unit, share, view, again=not stopping)
                        if taken:
                            queue.appendleft(unit)
                            pool.start(w.slot)
                    elif died not in (0, 128 + signal.SIGTERM, 128 + signal.SIGINT) \
                            and not stopping:
                        fatal = fatal or {"fatal": "crash", "message": f"{w.name} ended "
                                          f"before taking a run ({_death(died)})"}
                elif "fatal" in report:
                    fatal = fatal or report
                elif "summaries" in report:
                    todo = [r for r in unit if r.name in report["summaries"]]
                    summaries = [Summary.from_json(report["summaries"][r.name]) for r in todo]
                    share.record(todo, summaries)
                    view.ended(todo, summaries)
                # "busy": held outside the sweep; come back to it once the queue is empty
    finally:
        pool.close(signal.SIGTERM if stop.signum or sys.exc_info()[0] else None)
    if fatal:
        kind = {"usage": UsageError, "storage": StorageError}.get(fatal["fatal"], RuntimeError)
        raise kind(fatal["message"])
    if code is None:
        code = stopped_code(stop, share.summaries.values())
    return share.code() if code is None else code


def _died_training(worker, unit, share, view, again):
    """A worker died while training `unit`: its unfinished runs are recorded as failed, with
    why; True if the unit is to be handed to another worker (once per unit)."""
    from normexp import rundir
    died = _death(worker.proc.returncode)
    names = ", ".join(r.name for r in unit)
    left = [r for r in unit if rundir.status(r.cfg.run.dir) not in rundir.FINISHED]
    failed = [rundir.record_failure(r.cfg.run.dir, RuntimeError(
        f"its sweep worker (pid {worker.proc.pid}) died, {died}")) for r in left]
    again = again and names not in share.taken_over
    view.say(f"{worker.name} died ({died}) while training {names}; "
             + ("another worker takes it over" if again else "left failed"))
    if again:
        share.taken_over.add(names)
    else:
        share.record(left, failed)
    return again


class Pool:
    """The workers, the slot (cores, GPUs) each was started in, and their report pipes."""

    def __init__(self, slots, args):
        self.slots, self.args, self.workers = slots, args, []
        self.selector = selectors.DefaultSelector()
        for slot in range(len(slots)):
            self.start(slot)

    def start(self, slot):
        w = Worker(len(self.workers) + 1, self.args, self.slots[slot])
        w.slot = slot
        self.workers.append(w)
        self.selector.register(w.reports, selectors.EVENT_READ, w)

    def alive(self):
        return [w for w in self.workers if not w.reports.closed]

    def idle(self):
        return [w for w in self.alive() if w.unit is None and not w.proc.stdin.closed]

    def busy(self):
        return [w for w in self.workers if w.unit is not None]

    def reports(self, timeout=1.0):
        """[(worker, its report)] that came in; (worker, None) for a worker that ended."""
        out = []
        for key, _ in self.selector.select(timeout):
            w = key.data
            line = w.reports.readline()
            if line:
                out.append((w, json.loads(line)))
                continue
            self.selector.unregister(w.reports)
            w.reports.close()
            w.proc.wait()
            out.append((w, None))
        return out

    def stop(self, signum):
        """Every worker stops (signum) or ends after its current unit (None)."""
        for w in self.workers:
            w.stop(signum)

    def close(self, signum):
        self.stop(signum)
        for w in self.workers:
            w.proc.wait()
            if not w.reports.closed:
                w.reports.close()
        self.selector.close()


def die_with_parent():
    """In a worker: SIGTERM when the parent dies (Linux), and now if it died already."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the closed stdin still ends the worker
        pass
    if os.getppid() != int(os.environ.get("NORMEXP_PARENT", os.getppid())):
        os.kill(os.getpid(), signal.SIGTERM)


def serve():
    """A worker's life: train each unit its parent sends, answer with the summaries, exit at
    the end of the input or on a stop request (128 + the signal)."""
    from normexp.errors import BusyError, StorageError, UsageError
    from normexp.rundir import to_builtin
    from normexp.scheduler import stopped_code, train_unit
    from normexp.stop import StopRequests
    reports = os.fdopen(int(os.environ["NORMEXP_REPORT_FD"]), "w")

    def answer(report):
        try:
            reports.write(json.dumps(report, default=to_builtin) + "\n")
            reports.flush()
        except BrokenPipeError:  # the parent is gone: the runs' own records say it all
            pass

    with StopRequests() as stop:
        # A worker always stops cleanly (checkpoint, `interrupted`), however many stop
        # signals reach it: its parent's, the terminal's, and the kernel's each time the
        # process it was handed to on its parent's death ends in turn.
        stop.second_acts = False
        die_with_parent()
        for line in sys.stdin:
            if stop.signum:
                break
            cfgs = decode(line)
            try:
                summaries = train_unit(cfgs, stop, lambda text: print(text, file=sys.stderr))
            except BusyError as e:
                answer({"busy": str(e)})
                continue
            except (UsageError, StorageError) as e:
                answer({"fatal": "usage" if isinstance(e, UsageError) else "storage",
                        "message": str(e)})
                return 2 if isinstance(e, UsageError) else 74
            answer({"summaries": {c.run.name: s.to_json() for c, s in zip(cfgs, summaries)}})
            if stop.signum:
                break
        return stopped_code(stop) or 0
