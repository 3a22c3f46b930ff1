"""Orbax checkpoints of the whole train state, each verified before it is restored.

A save is complete only once `normexp.sha256` (the SHA-256 of every file orbax wrote, in
`sha256sum` format) stands beside it: a checkpoint without that record, or whose files no
longer match it, is damaged (a save cut short, a truncated or flipped file, a deleted
manifest) and is never restored. `sha256sum -c normexp.sha256` inside a step directory checks
it by hand.

Old checkpoints are deleted only once a newer one is recorded, so a run killed at any moment
keeps an intact checkpoint to resume from. With `background` saves (orbax's asynchronous
checkpointing) `save` returns once the state is copied to the host, so the step may donate
its buffers, and a thread records the checkpoint when orbax has finished writing it.
"""

import hashlib
import logging
import os
import re
import shutil
import sys
import threading

import jax
import orbax.checkpoint as ocp

from normexp.errors import UsageError
from normexp.parallel import barrier
from normexp.rundir import write_atomic
from normexp.stderr_filter import StderrFilter, quiet_failed_writers, writer_noise_held

# orbax narrates every save at INFO and prints whole tracebacks from its writer threads when a
# write fails; the failure reaches the caller as an exception, reported there in one line.
logging.getLogger("absl").setLevel(logging.CRITICAL)

RECORD = "normexp.sha256"
SET_ASIDE = "checkpoints_damaged"  # beside checkpoints/: orbax never sees what is moved there


def file_digests(step_dir):
    """{path relative to step_dir: sha256 hex} of every file but the record itself."""
    digests = {}
    for root, dirs, files in os.walk(step_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel == RECORD:
                continue
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            digests[rel] = digest.hexdigest()
    return digests


def damage(step_dir):
    """Why the checkpoint in `step_dir` cannot be trusted, or None if it is intact."""
    record = os.path.join(step_dir, RECORD)
    try:
        with open(record) as f:
            lines = [line.split(None, 1) for line in f.read().splitlines() if line.strip()]
    except FileNotFoundError:
        return f"no {RECORD} (its save did not finish)"
    except OSError as e:
        return f"cannot read {RECORD} ({e.strerror})"
    expected = {rel.strip(): digest for digest, rel in (p for p in lines if len(p) == 2)}
    if not expected or len(expected) != len(lines):
        return f"{RECORD} is malformed"
    try:
        actual = file_digests(step_dir)
    except OSError as e:
        return f"cannot read {e.filename} ({e.strerror})"
    for rel, digest in sorted(expected.items()):
        if rel not in actual:
            return f"{rel} is missing"
        if actual[rel] != digest:
            return f"{rel} does not match its checksum"
    return None


class Checkpoints:
    """The last `keep` checkpoints of a run under `directory`.

    On opening, every step directory is verified: `intact` lists the steps that may be
    restored, `damaged` maps the others to the reason. `primary` is the process that writes
    the checksum records (orbax coordinates the data files across processes itself).
    """

    def __init__(self, directory, keep, *, primary=True, background=False):
        self.directory = os.path.abspath(directory)
        self.primary, self.keep, self.background = primary, keep, background
        self._writer, self._failure = None, None  # a background save being finished
        self._broken = False  # a background save failed
        # orbax keeps every step: `_record` deletes the old ones once a newer one is recorded
        options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                               enable_async_checkpointing=background)
        if background and isinstance(sys.stderr, StderrFilter):  # installed by the process
            sys.stderr.saving_in_background()
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.damaged = {}
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if re.fullmatch(r"\d+", name) and os.path.isdir(path):
                reason = damage(path)
                if reason:
                    self.damaged[int(name)] = reason
        self.intact = sorted(set(self.manager.all_steps()) - set(self.damaged))

    def set_aside(self, step):
        """Move a damaged checkpoint out of the way (never delete it); returns where it went."""
        target = os.path.join(os.path.dirname(self.directory), SET_ASIDE, str(step))
        suffix = 1
        while os.path.exists(target):
            suffix += 1
            target = os.path.join(os.path.dirname(self.directory), SET_ASIDE, f"{step}.{suffix}")
        if self.primary:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        return target

    def reload(self):
        """Forget what was set aside (every process, once the primary has moved it)."""
        self.manager.reload()
        self.intact = sorted(set(self.manager.all_steps()) - set(self.damaged))

    def save(self, step, state):
        self.wait()
        if step in self.manager.all_steps():
            return
        try:
            with writer_noise_held():
                try:  # in the background: returns once the state is on the host
                    self.manager.save(step, args=ocp.args.StandardSave(state))
                except ValueError as e:  # tensorstore reports a failed write as a ValueError
                    raise _os_error(e) or e
        except OSError:
            self._remove_partial(step)  # never restorable; on a full disk it holds the space
            raise                       # the run's failure record needs
        if self.background:
            self._writer = threading.Thread(target=self._finish, args=(step,), daemon=True)
            self._writer.start()
        else:
            self._record(step)

    def _finish(self, step):
        try:
            self.manager.wait_until_finished()
            self._record(step)
        except Exception as e:  # raised in the training thread by `wait`
            quiet_failed_writers(os.dup(2))  # orbax's threads go on printing tracebacks
            self._failure, self._broken = (step, e), True

    def wait(self):
        """Until the last background save is recorded; raises its failure (an OSError for a
        failed write), as a synchronous save would have."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._failure is not None:
            (step, error), self._failure = self._failure, None
            self._remove_partial(step)
            error = _os_error(error) or error if isinstance(error, ValueError) else error
            raise error

    def _record(self, step):
        """Mark the step complete (its checksums), then delete the checkpoints beyond `keep`."""
        if self.primary:
            step_dir = os.path.join(self.directory, str(step))
            write_atomic(os.path.join(step_dir, RECORD), "".join(
                f"{digest}  {rel}\n" for rel, digest in file_digests(step_dir).items()))
        self.intact = sorted(set(self.intact) | {step})
        for old in self.intact[:-self.keep]:
            self.manager.delete(old)
        self.intact = self.intact[-self.keep:]

    def _remove_partial(self, step):
        if self.primary:
            for name in os.listdir(self.directory):
                if name.startswith(f"{step}.orbax-checkpoint-tmp"):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def restore(self, step, like):
        """The state saved at `step`, with the structure, shapes and dtypes of `like`."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(target))
        except (ValueError, KeyError, OSError) as e:
            raise UsageError(f"{self.directory}/{step}: cannot restore a checkpoint that "
                               f"passed its checksums ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:300]})") from None

    def close(self):
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:
                if not self._broken:  # else orbax raises the failure `wait` raised again
                    raise


def resume_step(runs):
    """The newest step of which every run (its Checkpoints) has an intact checkpoint; 0: none.

    Damaged checkpoints are moved aside with one warning line each, never deleted; with no
    intact one to fall back on, nothing is moved and the resume is refused.
    """
    intact = set.intersection(*(set(c.intact) for c in runs))
    damaged = [(c, step, why) for c in runs for step, why in sorted(c.damaged.items())]
    if damaged and not intact:
        c, step, why = damaged[-1]
        raise UsageError(f"{c.directory}/{step}: damaged ({why}) and no intact checkpoint to "
                         f"resume from; pass --overwrite to start the run again")
    start = max(intact, default=0)
    for c, step, why in damaged:
        where = c.set_aside(step)
        print(f"warning: {c.directory}/{step}: damaged ({why}); moved to {where}, resuming "
              f"from step {start}", file=sys.stderr)
    if damaged:
        barrier("normexp-damaged-checkpoints-moved")  # every process reloads what process 0 moved
        for c in runs:
            c.reload()
    return start


def _os_error(e):
    """The OSError behind a tensorstore write failure ("... [os_error_code='28']"), if any."""
    code = re.search(r"os_error_code='(\d+)'", str(e))
    if not code:
        return None
    path = re.search(r'Failed (?:writing|to write)[^"]*"([^"]+)"', str(e))
    number = int(code.group(1))
    return OSError(number, os.strerror(number), path.group(1) if path else None)
