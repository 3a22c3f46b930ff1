"""The run directory: created, checked for --resume, or replaced for --overwrite, and the
summary.json that says where a run stands.

Nothing is replaced silently. In a multi-process job only process 0 deletes, creates and writes
here; the others wait for it (a barrier), so no process reads a directory another is replacing.
"""

import json
import os
import platform
import shutil
from importlib import metadata

import numpy as np

from normexp import config as config_lib
from normexp.errors import UsageError
from normexp.parallel import barrier, is_primary
from normexp.tracking import write_atomic


def prepare(cfg, *, resume, overwrite, missing_ok=True):
    """Create (or check, for `resume`) the run directory; returns its path.

    `resume` continues an existing run; with `missing_ok` a run that does not exist yet is
    started (a sweep's runs), without it that is an error (`normexp train --resume`).
    """
    run_dir = cfg.run.dir
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other: continue the run or "
                         "replace it")
    saved = os.path.join(run_dir, "config.yaml")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UsageError(f"run.out_dir: {run_dir!r} is a file, not a directory")
    exists = os.path.isdir(run_dir) and bool(os.listdir(run_dir))
    if resume and not missing_ok and not exists:
        raise UsageError(f"no run at {run_dir} to resume; drop --resume to start it")
    if exists:
        if not os.path.isfile(saved):
            raise UsageError(f"{run_dir}: exists and is not a normexp run (no config.yaml); "
                             f"refusing to {'resume' if resume else 'replace'} it, choose "
                             f"another run.name or run.out_dir")
        if resume:
            differ = config_lib.differences(config_lib.load(saved), cfg)
            if differ:
                raise UsageError(f"{run_dir}: --resume with a config that differs from the "
                                 f"run's config.yaml in {', '.join(differ)}; pass {saved} "
                                 f"to continue it as it was")
        elif not overwrite:
            raise UsageError(f"{run_dir}: already exists; pass --resume to continue it or "
                             f"--overwrite to replace it")
    barrier("normexp-run-dir-checked")  # every process has looked before anything changes
    if is_primary():
        if exists and overwrite:
            shutil.rmtree(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        write_atomic(saved, config_lib.to_yaml(cfg))
    barrier("normexp-run-dir-ready")
    return run_dir


def versions():
    names = ["normexp", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"]
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_summary(run_dir, summary):
    """summary.json, replaced atomically by process 0."""
    if is_primary():
        write_atomic(os.path.join(run_dir, "summary.json"),
                     json.dumps(summary, indent=1, default=_to_builtin) + "\n")


def _to_builtin(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
