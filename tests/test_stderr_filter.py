import io
import itertools
import os
import queue
import sys
import threading

import pytest

from normexp import cli
from normexp.stderr_filter import StderrFilter

NOISE = ("Traceback (most recent call last):\n"
         '  File "/orbax/async.py", line 7, in _write\n'
         "    self._check_closed()\n"
         '  File "/asyncio/base_events.py", line 520, in _check_closed\n'
         "    raise RuntimeError('Event loop is closed')\n"
         "RuntimeError: Event loop is closed\n")
OTHER = ("Traceback (most recent call last):\n"
         '  File "/normexp/train.py", line 3, in run\n'
         "ValueError: a real error\n")


def test_the_filter_passes_everything_until_background_saves_start():
    stream = io.StringIO()
    stderr = StderrFilter(stream)
    for text in ("step 3", "\rstep 4", "\n", NOISE, OTHER):
        stderr.write(text)
    assert stream.getvalue() == "step 3\rstep 4\n" + NOISE + OTHER


def test_with_background_saves_it_drops_the_closed_loop_tracebacks_only():
    stream = io.StringIO()
    stderr = StderrFilter(stream)
    stderr.saving_in_background()
    stderr.write("\r 40%|####")  # a progress bar's unfinished line passes at once
    assert stream.getvalue() == "\r 40%|####"
    for line in (NOISE + "a warning\n" + NOISE + "\n" + OTHER).splitlines(keepends=True):
        stderr.write(line)  # the blank line: print() of a traceback's text
    stderr.write("half a li")
    stderr.write("ne\n")
    assert stream.getvalue() == "\r 40%|####" + "a warning\n" + OTHER + "half a line\n"


def test_interleaved_tracebacks_of_several_writer_threads_are_all_dropped():
    """Two of orbax's threads print their tracebacks at once, line by line, alternating (the
    interleaving forced: each thread writes a line when handed it); a real error passes."""
    stream = io.StringIO()
    stderr = StderrFilter(stream)
    stderr.saving_in_background()

    def thread():  # a write(text) that returns once another thread has written `text`
        jobs, done = queue.Queue(), threading.Semaphore(0)

        def loop():
            while (text := jobs.get()) is not None:
                stderr.write(text)
                done.release()
        threading.Thread(target=loop, daemon=True).start()
        return lambda text: (jobs.put(text), done.acquire(timeout=10))

    first, second = thread(), thread()
    for a, b in itertools.zip_longest(NOISE.splitlines(keepends=True),
                                      (NOISE + OTHER).splitlines(keepends=True)):
        for write, line in ((first, a), (second, b)):
            if line is not None:
                write(line)
    assert stream.getvalue() == OTHER


def test_after_a_failed_save_it_writes_to_the_real_fd_without_any_traceback():
    read, write = os.pipe()
    stream = io.StringIO()
    stderr = StderrFilter(stream)
    stderr.saving_in_background()
    stderr.write("before\n")
    stderr.writers_failed(write)
    for text in (NOISE, "\n", OTHER, "normexp: error: /r/c: File too large (errno 27)\n"):
        stderr.write(text)
    stderr.writers_failed(os.dup(read))  # a second failure: fd 2 already went to /dev/null
    stderr.write("after\n")
    stderr.stream.close()
    with os.fdopen(read) as f:  # line by line: the exception's own line is not a traceback's
        assert f.read() == ("ValueError: a real error\n"
                            "normexp: error: /r/c: File too large (errno 27)\nafter\n")
    assert stream.getvalue() == "before\n"


@pytest.mark.parametrize("command, installed", [("train", True), ("sweep", True),
                                                 ("claims", True), ("ls", False)])
def test_the_filter_is_installed_by_the_commands_that_train(tmp_path, monkeypatch, command,
                                                            installed):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # and back after the test
    monkeypatch.chdir(tmp_path)
    args = {"train": ["model.n_layer"], "sweep": ["missing.yaml"],
            "claims": ["--only", "1", "--scale", "x=1"], "ls": ["."]}[command]
    cli.main([command, *args])  # each stops at once, most with a usage error
    assert isinstance(sys.stderr, StderrFilter) is installed
    if installed:  # once per process, passing on what the command said
        cli.main([command, *args])
        assert not isinstance(sys.stderr.stream, StderrFilter)
        assert "error" in sys.stderr.stream.getvalue()
