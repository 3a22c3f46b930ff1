"""`normexp sweep --max-parallel K`: K worker processes, each on its own share of the cores
and of the host's GPUs.

The parent starts the workers (`run_workers`), each a `normexp sweep --worker` over the same
units; the run locks share the work among them. A worker pins itself (`pin`) before it imports
anything that starts a thread pool. This module imports only the standard library at the top,
so that `normexp.cli` can pin a worker first; the parent never starts jax, so it holds no
accelerator memory while its workers train.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time


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


def run_workers(sweep, units, k, progress):
    """K copies of this sweep in child processes; the run locks share the work among them."""
    from normexp.rundir import FINISHED, status
    from normexp.sweep import _bar, _done
    # no more workers than units with work left: an idle worker would keep its cores idle too
    k = max(1, min(k, sum(any(status(r.cfg.run.dir) not in FINISHED for r in u) for u in units)))
    args = [sys.executable, "-m", "normexp.cli", "sweep", sweep.path, "--out", sweep.out_dir,
            "--worker"] + [f"--set={key}={v if isinstance(v, str) else json.dumps(v)}"
                           for key, v in sweep.settings]
    env = dict(os.environ, NORMEXP_WORKER="1")  # no step bars: the parent draws one bar
    ids = ",".join(str(i) for i, u in enumerate(sweep.units()) if u in units)
    gpus = visible_gpus()
    # each child pins itself (pin): a preexec_fn would run Python between fork and exec of a
    # parent that may already run JAX's threads
    children = [subprocess.Popen(args + ["--units", ids],
                                 env=dict(env, **worker_env(cores, *share)))
                for cores, share in zip(worker_cores(k), worker_gpus(k, gpus))]
    bar = _bar(sum(len(u) for u in units), _done(units), progress)
    try:
        while any(c.poll() is None for c in children):
            time.sleep(1.0)
            bar.update(_done(units) - bar.n)
    except BaseException:
        for c in children:
            c.send_signal(signal.SIGTERM)
        for c in children:
            c.wait()
        raise
    finally:
        bar.close()
    codes = [c.returncode for c in children]
    return max(codes, key=abs) if any(codes) else 0
