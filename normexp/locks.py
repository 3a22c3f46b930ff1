"""One lock file per run, so that two processes (shards, workers, a rerun) never train it at once.

The lock is `flock` on `<sweep>/.locks/<run>.lock`: the kernel (or the NFS server) drops it when
its holder dies, however it dies, so a lock left by a killed process is stale by construction
and is taken over. The file records its holder (host, pid, start) for the messages.
"""

import fcntl
import json
import os
import socket
import time

from normexp.errors import UsageError


def _holder(path):
    try:
        with open(path) as f:
            info = json.load(f)
        return f"{info['host']} pid {info['pid']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown process"


class RunLock:
    """`acquire()` -> True if this process now holds the run, False if another one does."""

    def __init__(self, directory, name):
        self.path = os.path.join(directory, ".locks", name + ".lock")
        self.fd = None
        self.stale = None  # who held it before, when a dead holder's file was taken over

    def acquire(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as e:
            os.close(fd)
            raise UsageError(f"{self.path}: this filesystem refuses file locks ({e.strerror}); "
                             f"a sweep needs flock on its out_dir (on Lustre mount with -o flock)"
                             ) from None
        if os.fstat(fd).st_size:
            self.stale = _holder(self.path)
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return True

    def held(self):
        """True if a live process holds the lock now (probed without taking it over)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing drops the probe's lock
        return False

    def holder(self):
        return _holder(self.path)

    def release(self):
        """Empty the file, then unlock: an empty unlocked file is a cleanly released lock."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
