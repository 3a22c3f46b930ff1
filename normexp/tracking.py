"""What a run writes: metrics.jsonl, TensorBoard events, and files replaced atomically."""

import json
import math
import os
import tempfile


def write_atomic(path, content):
    """Write text or bytes to `path` through a temp file and a rename: never half-written."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def finite_or_none(value):
    """JSON has no NaN or inf: a non-finite metric is written as null."""
    value = float(value)
    return value if math.isfinite(value) else None


def read_json(path):
    """A JSON file's content, or None if it is missing or unreadable (being replaced)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_metrics(path):
    """The records of a metrics.jsonl; a truncated last line (a killed writer) is skipped."""
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


class Tracker:
    """Appends one JSON object per logged step to metrics.jsonl, and mirrors it to TensorBoard.

    `start_step` > 0 resumes: records at or after it are dropped (they will be logged again
    by the resumed run) and TensorBoard purges its events from that step on. A tracker that is
    not `enabled` (a secondary process of a multi-host job) writes nothing.
    """

    def __init__(self, run_dir, *, start_step=0, tensorboard=True, enabled=True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        kept = [r for r in read_metrics(self.path) if r["step"] < start_step]
        self.kept = kept  # what earlier processes of this run logged (best val loss so far)
        self.file = self.tb = None
        if not enabled:
            return
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(run_dir, purge_step=start_step or None, flush_secs=10)

    def log(self, step, metrics):
        if self.file is None:
            return
        record = {"step": int(step), **{k: finite_or_none(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, float(value), int(step))

    def hparams(self, values, metrics=("loss", "val_loss")):
        """Record a run's hyperparameters for TensorBoard's HParams dashboard, in the run's own
        event file, with `metrics` (tags this run logs) as the columns to compare."""
        if self.tb is None:
            return
        from tensorboardX.summary import hparams
        experiment, start, end = hparams(values, {tag: 0.0 for tag in metrics})
        for summary in (experiment, start, end):
            self.tb.file_writer.add_summary(summary)

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
