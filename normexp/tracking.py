"""What a run writes: metrics.jsonl, TensorBoard events, and files replaced atomically."""

import json
import math
import os
import tempfile
import threading

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


_SESSION_STATUS = {"completed": "STATUS_SUCCESS", "diverged": "STATUS_FAILURE",
                   "failed": "STATUS_FAILURE"}


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
        # tensorboardX also returns a session end marked SUCCESS; end_session writes the real one.
        experiment, start, _ = hparams(values, {tag: 0.0 for tag in metrics})
        for summary in (experiment, start):
            self.tb.file_writer.add_summary(summary)

    def end_session(self, status):
        """End the HParams session with a run's status (summary.json's). An interrupted run is
        UNKNOWN, not FAILURE: --resume continues it. Built as tensorboardX.summary.hparams
        builds its session end, which can only say SUCCESS."""
        if self.tb is None:
            return
        from tensorboardX.proto.api_pb2 import Status
        from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo
        from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
        end = SessionEndInfo(status=Status.Value(_SESSION_STATUS.get(status, "STATUS_UNKNOWN")))
        content = HParamsPluginData(session_end_info=end, version=0)
        metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
            plugin_name="hparams", content=content.SerializeToString()))
        self.tb.file_writer.add_summary(Summary(value=[Summary.Value(
            tag="_hparams_/session_end_info", metadata=metadata)]))

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
