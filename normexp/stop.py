"""Stop requests: SIGINT and SIGTERM become a flag that the loop reads once per step.

Reading it once matters: a signal that lands while a checkpoint is written must be seen at the
next step's single reading, never half-seen by one check and missed by another (which once
marked an unfinished run completed). In a job of several processes a signal may reach only one
of them, and a process that stops alone leaves the others waiting in a collective forever; so
there the flag is read only at log steps, through a tiny all-gather, and every process takes
the same decision at the same step.

A sweep (or a sweep's worker) holds one StopRequests across all its runs and hands it to each:
a signal that lands after a run's last step, while its final evaluation and summary are
written, is then still there when the sweep decides whether to start the next run.
"""

import signal


class StopRequests:
    def __init__(self):
        self.signum = None
        self.second_acts = True

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.signum = self.signum or signum
        if self.second_acts:  # a second Ctrl-C acts at once
            signal.signal(signum, self.previous[signum])

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def decide(self, log_step):
        """The signal to stop on at this step, or None: the loop's one reading of the flag."""
        import jax  # here: a sweep's parent process holds a StopRequests and never starts jax
        import numpy as np
        if jax.process_count() == 1:
            return self.signum
        if not log_step:
            return None
        from jax.experimental import multihost_utils
        every_process = multihost_utils.process_allgather(np.int32(self.signum or 0))
        return int(np.max(every_process)) or None
