"""The exceptions that the command line turns into one line on stderr and a distinct exit code."""

EXIT_USAGE = 2     # a usage, config or data error: nothing was written
EXIT_STORAGE = 74  # the disk refused a write or read (sysexits' EX_IOERR); the run can resume


class UsageError(Exception):
    """Bad user input (config, data, command line): the message names what to change."""


class StorageError(Exception):
    """The file system failed the run (disk full, read-only, permission denied)."""

    @classmethod
    def from_os(cls, e):
        where = e.filename or "?"
        return cls(f"{where}: {e.strerror or e} (errno {e.errno})")
