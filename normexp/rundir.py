"""The run directory and its format: the one place that knows what a run leaves on disk.

    <run>/config.yaml    the resolved config, written first (a directory without it is no run)
    <run>/summary.json   where the run stands: `status` and its figures, replaced atomically
    <run>/metrics.jsonl  one JSON object per logged step, `{"step": s, <metric>: value, ...}`
    <run>/checkpoints/   see normexp.checkpoint; TensorBoard events beside them

A run's status is one of STATUSES; `Summary` is summary.json's record, and this module its only
writer and reader. Metric names are normexp.metric_names'.

Nothing is replaced silently. In a multi-process job only process 0 deletes, creates and writes
here; the others wait for it (a barrier), so no process reads a directory another is replacing.
"""

import dataclasses
import json
import math
import os
import platform
import shutil
import tempfile
import threading
from importlib import metadata

import numpy as np

from normexp import config as config_lib
from normexp.errors import UsageError
from normexp.locks import RunLock
from normexp.parallel import barrier, is_primary

CONFIG, SUMMARY, METRICS = "config.yaml", "summary.json", "metrics.jsonl"
SWEEP_MANIFEST = "sweep.json"  # in a sweep's directory, beside its runs (normexp.sweep)

# Written by the run itself:
RUNNING = "running"  # training, or its process died (a sweep reads that as STOPPED)
COMPLETED = "completed"  # trained every step
DIVERGED = "diverged"  # a loss or gradient norm went non-finite: a result, not an error
INTERRUPTED = "interrupted"  # stopped by a signal or by losing a process; --resume continues it
FAILED = "failed"  # an error ended it (`error` says which); --resume retries it
# Read off the directory by whoever lists runs:
PENDING = "pending"  # a sweep's run with no directory yet
STARTED = "started"  # a directory without a summary.json yet
STOPPED = "stopped"  # still `running` on disk, but no live process holds its lock
STATUSES = (RUNNING, COMPLETED, DIVERGED, INTERRUPTED, FAILED, PENDING, STARTED, STOPPED)
FINISHED = (COMPLETED, DIVERGED)  # never trained again


# --- files, written whole or not at all ---

_umask = None
_umask_lock = threading.Lock()


def _file_mode():
    """The mode open() gives a new file: 0o666 less the process umask."""
    global _umask
    with _umask_lock:
        if _umask is None:
            # The umask can only be read by setting it; in between, a file another thread
            # creates is at worst too private, never too public.
            _umask = os.umask(0o077)
            os.umask(_umask)
    return 0o666 & ~_umask


def write_atomic(path, content):
    """Write text or bytes to `path` through a temp file and a rename: never half-written."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
    try:
        # mkstemp makes the file 0600 whatever the umask; colleagues sharing a cluster read
        # configs, metrics and reports, so the file gets the mode any other file would.
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path):
    """A JSON file's content, or None if it is missing or unreadable (being replaced)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --- metrics.jsonl ---

def finite_or_none(value):
    """JSON has no NaN or inf: a non-finite metric is written as null."""
    value = float(value)
    return value if math.isfinite(value) else None


def metrics_line(step, metrics):
    """One record of metrics.jsonl: the step first, then the metrics in their order."""
    return json.dumps({"step": int(step), **{k: finite_or_none(v) for k, v in metrics.items()}})


def write_metrics(path, records):
    """Replace a metrics.jsonl with `records` (as read back: a resumed run keeps its past)."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def read_metrics(path):
    """The records of a metrics.jsonl (a run directory or the file itself); a truncated last
    line (a killed writer) is skipped."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS)
    records = []
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


# --- summary.json and config.yaml ---

@dataclasses.dataclass(frozen=True)
class Summary:
    """summary.json: where a run stands and its figures; README's table says what each key
    holds. Written (by `write_summary`) when the run starts, and replaced whole when it stops;
    `signal`, `error` and `history` only where they are set."""
    status: str  # one the run writes: RUNNING, COMPLETED, DIVERGED, INTERRUPTED, FAILED
    steps: int | None = None
    diverged_step: int | None = None
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    loss_spike_score: float | None = None
    grad_norm_spike_score: float | None = None
    tokens_per_s: float | None = None
    compile_seconds: float | None = None
    data_fingerprint: dict | None = None
    norms: dict | None = None
    vectorized_runs: int | None = None
    devices: int | None = None
    hardware: dict | None = None
    allocator: str | None = None
    versions: dict | None = None
    run_dir: str | None = None
    signal: str | None = None  # an interrupted run's
    error: str | None = None  # a failed run's, or what interrupted a run that no signal stopped
    history: tuple = ()  # a resumed run's earlier attempts, each as `attempt()` gave it
    resumed_at: int | None = None  # a resumed run's: the checkpoint this attempt started from

    def __post_init__(self):
        if self.status not in WRITTEN:
            raise ValueError(f"summary status {self.status!r}: one of {', '.join(WRITTEN)}")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def attempt(self):
        """What ended this attempt, for the next one's `history`."""
        return {k: v for k, v in self.to_json().items() if k in _ATTEMPT}

    def to_json(self):
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: list(v) if k == "history" else v for k, v in fields.items()
                if k not in _WHEN_SET or v}

    @classmethod
    def from_json(cls, record):
        """The record of a summary.json's content; None if it has no status a run writes
        (keys of other normexp versions are ignored)."""
        if not isinstance(record, dict) or record.get("status") not in WRITTEN:
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if k == "history" else v for k, v in record.items()
                      if k in known})


WRITTEN = (RUNNING, COMPLETED, DIVERGED, INTERRUPTED, FAILED)
_WHEN_SET = ("signal", "error", "history", "resumed_at")
_ATTEMPT = ("status", "steps", "signal", "error")
SUMMARY_KEYS = tuple(f.name for f in dataclasses.fields(Summary))


def write_summary(run_dir, summary, *, any_process=False):
    """summary.json, replaced atomically by process 0 (by this process with `any_process`:
    each survivor of a job that lost a process records how the run ended, the same record
    but for the process it names)."""
    if any_process or is_primary():
        write_atomic(os.path.join(run_dir, SUMMARY),
                     json.dumps(summary.to_json(), indent=1, default=to_builtin) + "\n")


def to_builtin(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_summary(run_dir):
    """The run's Summary; None where there is none yet (or it is being replaced)."""
    return Summary.from_json(read_json(os.path.join(run_dir, SUMMARY)))


def read_config(run_dir):
    """The run's config.yaml, flattened to dotted keys, values in today's spelling."""
    return config_lib.current_spelling(
        config_lib.flatten(config_lib.read_yaml(os.path.join(run_dir, CONFIG))))


def is_run(path):
    return os.path.isfile(os.path.join(path, CONFIG))


def status(run_dir, probe=False):
    """What summary.json says, or PENDING (no directory) or STARTED (no summary yet). With
    `probe`, a run marked running (or started) whose lock no live process holds is STOPPED:
    its process is gone, and the next sweep or `--resume` continues it. (The probe never
    takes the lock, so it cannot keep a sweep from taking the run.)"""
    if not os.path.isdir(run_dir):
        return PENDING
    summary = read_summary(run_dir)
    found = summary.status if summary else STARTED
    if probe and found in (RUNNING, STARTED) and not RunLock.of(run_dir).held():
        return STOPPED
    return found


def record_failure(run_dir, error):
    """Mark a run whose training raised `failed` in its summary.json (if it is a run yet),
    keeping what the summary already said (its steps, the `history` of earlier attempts)."""
    earlier = read_summary(run_dir) if is_run(run_dir) else None
    summary = (earlier or Summary(FAILED)).replace(
        status=FAILED, error=f"{type(error).__name__}: {error}", run_dir=os.path.abspath(run_dir))
    if is_run(run_dir):
        write_summary(run_dir, summary)
    return summary


def versions():
    names = ["normexp", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"]
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# --- creating, resuming and replacing ---

def prepare(cfg, *, resume, overwrite, missing_ok=True):
    """Create (or check, for `resume`) the run directory; returns its path.

    `resume` continues an existing run; with `missing_ok` a run that does not exist yet is
    started (a sweep's runs), without it that is an error (`normexp train --resume`).
    """
    run_dir = cfg.run.dir
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other: continue the run or "
                         "replace it")
    saved = os.path.join(run_dir, CONFIG)
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
