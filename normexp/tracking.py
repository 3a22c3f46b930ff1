"""What a run writes while it trains: metrics.jsonl records, TensorBoard events and, with
`log.wandb.mode`, a Weights & Biases run."""

import hashlib
import os

from normexp import rundir
from normexp.errors import UsageError
from normexp.metric_names import LOSS, VAL_LOSS
from normexp.rundir import metrics_line, read_metrics

_SESSION_STATUS = {rundir.COMPLETED: "STATUS_SUCCESS", rundir.DIVERGED: "STATUS_FAILURE",
                   rundir.FAILED: "STATUS_FAILURE"}


class Tracker:
    """Appends one JSON object per logged step to metrics.jsonl, and mirrors it to TensorBoard.

    `start_step` > 0 resumes: records at or after it are dropped (they will be logged again
    by the resumed run) and TensorBoard purges its events from that step on. A tracker that is
    not `enabled` (a secondary process of a multi-host job) writes nothing.
    """

    def __init__(self, run_dir, *, start_step=0, tensorboard=True, enabled=True, wandb=None,
                 name=None, config=None):
        self.path = os.path.join(run_dir, rundir.METRICS)
        kept = [r for r in read_metrics(self.path) if r["step"] < start_step]
        self.kept = kept  # what earlier processes of this run logged (best val loss so far)
        self.file = self.tb = self.wandb = None
        if not enabled:
            return
        rundir.write_metrics(self.path, kept)
        self.file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(run_dir, purge_step=start_step or None, flush_secs=10)
        if wandb is not None and wandb.mode != "off":
            self.wandb = wandb_run(run_dir, wandb, name, config)
            # wandb's steps only increase: after a resume, the steps it already has are not
            # logged again (metrics.jsonl and TensorBoard rewind to the checkpoint instead)
            self.wandb_next = self.wandb.step

    def log(self, step, metrics):
        if self.file is None:
            return
        self.file.write(metrics_line(step, metrics) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, float(value), int(step))
        if self.wandb is not None and step >= self.wandb_next:
            self.wandb.log({k: float(v) for k, v in metrics.items()}, step=int(step))
            self.wandb_next = step + 1

    def hparams(self, values, metrics=(LOSS, VAL_LOSS)):
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
        builds its session end, which can only say SUCCESS. The wandb run gets the status in
        its summary and ends."""
        if self.wandb is not None:
            self.wandb.summary["status"] = status
            self.wandb.finish(exit_code=0 if status in rundir.FINISHED else 1)
            self.wandb = None
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
        if self.wandb is not None:
            self.wandb.finish(exit_code=1)


def require_wandb(settings):
    """Before anything is written: log.wandb on needs the wandb package."""
    if settings.mode == "off":
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UsageError(f"log.wandb.mode={settings.mode}: needs the wandb package (pip "
                         f"install 'normexp[wandb]'), or log.wandb.mode=off") from None


def wandb_run(run_dir, settings, name, config):
    """The run's wandb run, its files under run_dir/wandb. Its id comes from the run's
    directory, so a resumed run continues the same wandb run; its group is log.wandb.group,
    or the sweep's name (its directory's) for a sweep's runs."""
    import wandb
    run_id = hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:16]
    return wandb.init(project=settings.project, entity=settings.entity or None,
                      group=wandb_group(run_dir, settings),
                      name=name, id=run_id, resume="allow", dir=run_dir, config=config,
                      reinit="create_new",  # a vectorized group's runs are open at once
                      mode=settings.mode, settings=wandb.Settings(silent=True))


def wandb_group(run_dir, settings):
    """log.wandb.group, else the sweep's name for a run inside a sweep's directory."""
    parent = os.path.dirname(os.path.abspath(run_dir))
    if settings.group:
        return settings.group
    return os.path.basename(parent) if os.path.isfile(
        os.path.join(parent, rundir.SWEEP_MANIFEST)) else None
