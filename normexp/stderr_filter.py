"""The stderr of a process that saves checkpoints in the background: when a write fails,
orbax's writer threads, asyncio and tensorstore's callbacks print hundreds of traceback lines
for the one failure, which reaches the caller as an exception and is reported there in one line.
`StderrFilter` drops those tracebacks and passes everything else on; `normexp.checkpoint` tells
it when background saves start and holds fd 2 around each save (`writer_noise_held`).

No JAX here: the commands that train install the filter before they parse a config, so a
config error is reported without loading JAX.
"""

import contextlib
import logging
import os
import sys
import tempfile
import threading
import warnings


@contextlib.contextmanager
def writer_noise_held():
    """Hold back what is written to fd 2 during a save, and pass it on if the save succeeds.

    When a write fails, orbax's writer threads, asyncio and tensorstore's callbacks print
    hundreds of traceback lines for the one failure (some after the save has raised, into an
    event loop orbax has closed), while the failure itself reaches the caller as an exception
    and is reported there in one line. So after a failure, in a process that installed a
    `StderrFilter`, fd 2 is left to them, pointed at /dev/null, and the filter (Python's
    stderr) writes to the real one, without those tracebacks (see `quiet_failed_writers`).
    """
    sys.stderr.flush()
    real = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            quiet_failed_writers(real)
            raise
        os.dup2(real, 2)
        os.close(real)
        held.seek(0)
        passed_on = held.read()
    if passed_on:
        os.write(2, passed_on)


def quiet_failed_writers(real):
    """After a failed save, in a process that installed a `StderrFilter`: fd 2 to /dev/null for
    orbax's threads, the filter's output to `real` (a duplicate of the real fd 2) and rid of
    their tracebacks. In any other process (a notebook's, a script's) fd 2 is given back and
    nothing else is changed: the failure still reaches the caller as an exception."""
    if not isinstance(sys.stderr, StderrFilter):
        os.dup2(real, 2)
        os.close(real)
        return
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 2)
    os.close(quiet)
    sys.stderr.writers_failed(real)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # unretrieved futures
    warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)


class StderrFilter:
    """sys.stderr of a process that may save checkpoints in the background, installed once
    where such a process is set up (`normexp.cli.main`, for the commands that train), never by
    a save. It passes everything on until then; `Checkpoints` tells it what happens:

    - `saving_in_background` (a `Checkpoints` with background saves opens): orbax's writer
      threads print a traceback ending in "RuntimeError: Event loop is closed" for every write
      still in flight when one fails, before the failure reaches `Checkpoints.wait`. Those are
      dropped; every other line passes on, and a progress bar's unfinished line passes at once.
    - `writers_failed` (a save failed): fd 2 now goes to /dev/null, and the filter writes to
      the real one instead, dropping the lines of the tracebacks that orbax's threads go on
      printing (frames, headers, "RuntimeError: Event loop is closed"), line by line, since
      several threads print at once and their writes interleave, and passing on every other
      line, the run's one-line error among them.
    """

    FRAMES = ("  File ", "    self._check_closed()",
              "    raise RuntimeError('Event loop is closed')")
    NOISE = ("Traceback (most recent call last)", " ", "RuntimeError: Event loop is closed")

    def __init__(self, stream):
        # per thread: the line it has begun and the traceback lines held back, since several
        # threads print at once and their writes interleave
        self.stream, self.partial, self.held, self.lock = stream, {}, {}, threading.Lock()
        self.dropped = set()  # the threads whose last line ended a dropped traceback
        self.background = self.failed = False

    def saving_in_background(self):
        self.background = True

    def writers_failed(self, real):
        """From now on write to `real` (a file descriptor), dropping every traceback line."""
        with self.lock:
            if self.failed:  # fd 2 already went to /dev/null, and `real` with it
                os.close(real)
                return
            self.stream = os.fdopen(real, "w", buffering=1)
            self.partial, self.held, self.failed = {}, {}, True

    def write(self, text):
        if not (self.background or self.failed):
            self.stream.write(text)
            return len(text)
        with self.lock:
            me = threading.get_ident()
            if self.failed:
                *lines, self.partial[me] = (self.partial.get(me, "") + text).split("\n")
                for line in lines:  # and the blank lines some print after a traceback
                    if line and not line.startswith(self.NOISE):
                        self.stream.write(line + "\n")
                return len(text)
            if "\n" not in text and not self.partial.get(me) and not self.held.get(me):
                self.stream.write(text)
                return len(text)
            *lines, self.partial[me] = (self.partial.get(me, "") + text).split("\n")
            for line in lines:
                self._line(me, line)
        return len(text)

    def _line(self, me, line):
        held = self.held.get(me)
        if line.startswith("Traceback (most recent call last)"):
            self._release(me)
            self.held[me] = [line]
            self.dropped.discard(me)
        elif held and line.startswith(self.FRAMES):
            held.append(line)
        elif held and line == "RuntimeError: Event loop is closed":
            self.held[me] = []
            self.dropped.add(me)
        elif line == "" and me in self.dropped:  # print() of a traceback ends in a blank line
            self.dropped.discard(me)
        else:
            self.dropped.discard(me)
            self._release(me)
            self.stream.write(line + "\n")

    def _release(self, me):
        for line in self.held.pop(me, None) or []:
            self.stream.write(line + "\n")

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)
