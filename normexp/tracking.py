"""What a run writes while it trains: metrics.jsonl records and TensorBoard events."""

import os

from normexp import rundir
from normexp.rundir import metrics_line, read_metrics

_SESSION_STATUS = {rundir.COMPLETED: "STATUS_SUCCESS", rundir.DIVERGED: "STATUS_FAILURE",
                   rundir.FAILED: "STATUS_FAILURE"}


class Tracker:
    """Appends one JSON object per logged step to metrics.jsonl, and mirrors it to TensorBoard.

    `start_step` > 0 resumes: records at or after it are dropped (they will be logged again
    by the resumed run) and TensorBoard purges its events from that step on. A tracker that is
    not `enabled` (a secondary process of a multi-host job) writes nothing.
    """

    def __init__(self, run_dir, *, start_step=0, tensorboard=True, enabled=True):
        self.path = os.path.join(run_dir, rundir.METRICS)
        kept = [r for r in read_metrics(self.path) if r["step"] < start_step]
        self.kept = kept  # what earlier processes of this run logged (best val loss so far)
        self.file = self.tb = None
        if not enabled:
            return
        rundir.write_metrics(self.path, kept)
        self.file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(run_dir, purge_step=start_step or None, flush_secs=10)

    def log(self, step, metrics):
        if self.file is None:
            return
        self.file.write(metrics_line(step, metrics) + "\n")
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
