"""The exceptions that the command line turns into one line on stderr and a distinct exit code,
and the one "did you mean" rule their messages use."""

import difflib

EXIT_USAGE = 2     # a usage, config or data error: nothing was written
EXIT_STORAGE = 74  # the disk refused a write or read (sysexits' EX_IOERR); the run can resume
EXIT_BUSY = 75     # another live process trains the run now (sysexits' EX_TEMPFAIL): try later
EXIT_LOST = 69     # a process of a multi-process job was lost (sysexits' EX_UNAVAILABLE): --resume


class UsageError(Exception):
    """Bad user input (config, data, command line): the message names what to change."""


class StorageError(Exception):
    """The file system failed the run (disk full, read-only, permission denied)."""

    @classmethod
    def from_os(cls, e):
        where = e.filename or "?"
        return cls(f"{where}: {e.strerror or e} (errno {e.errno})")


class LostProcessError(Exception):
    """A process of this multi-process job ended while this one trained (killed, its host
    lost): the run is recorded as interrupted and the whole job resumes with --resume."""


class BusyError(Exception):
    """Another live process holds a run's lock (normexp.locks); `lock` is that lock."""

    def __init__(self, message, lock=None):
        super().__init__(message)
        self.lock = lock


def suggest(name, valid):
    """The valid name that `name` most likely meant, or None. A name it extends or abbreviates
    comes first (prenorm -> pre, layer -> layernorm): by spelling alone difflib ranks prenorm
    nearer to deepnorm than to pre."""
    text = str(name).lower()
    affixed = [v for v in valid if text and (text.startswith(v.lower()) or
                                             v.lower().startswith(text))]
    if affixed:
        return max(affixed, key=len)
    near = difflib.get_close_matches(str(name), list(valid), n=1)
    return near[0] if near else None
