import errno

from normexp.errors import EXIT_STORAGE, EXIT_USAGE, StorageError


def test_a_storage_error_names_the_file_the_reason_and_the_errno():
    error = StorageError.from_os(OSError(errno.ENOSPC, "No space left on device", "/runs/x"))
    assert str(error) == f"/runs/x: No space left on device (errno {errno.ENOSPC})"
    assert str(StorageError.from_os(OSError(errno.EIO, "I/O error"))).startswith("?: I/O error")
    assert EXIT_USAGE == 2 and EXIT_STORAGE not in (0, 1, 2)
