"""One lock file per run: whoever trains a run (a sweep, a worker, a shard, `normexp train`)
holds its lock for the whole time, so no two processes ever train it at once.

The lock is an open-file-description lock (`F_OFD_SETLK`) on `<parent>/.locks/<run>.lock`
beside the run directory. The kernel (or the NFS server) drops it when its holder dies, however
it dies, so a lock left by a killed process is stale by construction and is taken over. Such a
lock can be tested without taking it (`F_OFD_GETLK`): a reader asking whether a run is being
trained never keeps a sweep from taking it (a probe by `flock` did, for the instant it held a
shared lock). Where the platform has no OFD locks (macOS), `flock` stands in, probe included.
The file records its holder (host, pid, start) for the messages.
"""

import errno
import fcntl
import json
import os
import socket
import struct
import time

from normexp.errors import BusyError, StorageError, UsageError

_OFD = hasattr(fcntl, "F_OFD_SETLK")
# struct flock in the native layout: l_type, l_whence, l_start, l_len, l_pid (then padding,
# which the zero bytes after it stand for)
_FLOCK = "hhqqi"


def _flock_struct(kind):
    return struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 0, 0) + bytes(8)


def _holder(path):
    try:
        with open(path) as f:
            info = json.load(f)
        return f"{info['host']} pid {info['pid']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown process"


def _lock(fd):
    """Take the exclusive lock on `fd` without waiting; False if another holder has it."""
    try:
        if _OFD:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock_struct(fcntl.F_WRLCK))
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def _locked(fd):
    """Whether another open file description holds a lock on `fd`'s file (never takes it)."""
    if _OFD:
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock_struct(fcntl.F_WRLCK))
        return struct.unpack_from(_FLOCK, answer)[0] != fcntl.F_UNLCK
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


class RunLock:
    """`acquire()` -> True if this process now holds the run, False if another one does."""

    def __init__(self, directory, name):
        self.path = os.path.join(directory, ".locks", name + ".lock")
        self.fd = None
        self.stale = None  # who held it before, when a dead holder's file was taken over

    @classmethod
    def of(cls, run_dir):
        """The lock of the run in `run_dir`: `<parent>/.locks/<name>.lock`, the one a sweep
        takes for its run of that name and `normexp train` for that directory."""
        run_dir = os.path.normpath(os.path.abspath(run_dir))
        return cls(os.path.dirname(run_dir), os.path.basename(run_dir))

    def acquire(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            taken = _lock(fd)
        except OSError as e:
            os.close(fd)
            raise UsageError(f"{self.path}: this filesystem refuses file locks ({e.strerror}); "
                             f"a sweep needs locks on its out_dir (on Lustre mount with -o flock)"
                             ) from None
        if not taken:
            os.close(fd)
            return False
        if os.fstat(fd).st_size:
            self.stale = _holder(self.path)
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return True

    def held(self):
        """True if a live process (other than through this object) holds the lock now."""
        if self.fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            return _locked(fd)
        finally:
            os.close(fd)

    def holder(self):
        return _holder(self.path)

    def release(self):
        """Empty the file, then unlock: an empty unlocked file is a cleanly released lock."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing the only descriptor drops the lock
        self.fd = None


def take_all(run_dirs):
    """The locks of all these runs, or none: taken in a fixed order and released again as
    soon as one is busy (BusyError then names it and its holder). Two processes that reach
    the same group together cannot each end up holding a part of it."""
    taken = []
    for run_dir in sorted(run_dirs):
        lock = RunLock.of(run_dir)
        try:
            acquired = lock.acquire()
        except OSError as e:  # a read-only or full disk: named by the run it stops
            release_all(taken)
            raise StorageError(f"{run_dir}: {e.strerror} (errno {e.errno}), writing its lock "
                               f"{lock.path}") from None
        if not acquired:
            release_all(taken)
            raise BusyError(f"{run_dir}: being trained by {lock.holder()} (its lock "
                            f"{lock.path} is held)", lock)
        taken.append(lock)
    return taken


def release_all(locks):
    for lock in locks:
        lock.release()
