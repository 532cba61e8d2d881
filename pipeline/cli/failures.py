"""Failures of the world rather than of kiln, turned into the one line the CLI prints.

A registry that does not answer, a full, read-only or failing disk, memory exhausted: each is
reported with a fix and exit 1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os

from kiln.common.errors import KilnError


def known_failure(exc: BaseException) -> KilnError | None:
    """The one line for `exc`, or None when it is not a known failure of the world."""
    from kiln.registry import unreachable

    found = unreachable(exc)
    if found is not None:
        return found
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:   # libraries wrap the OSError in their own errors
        seen.add(id(cause))
        if isinstance(cause, MemoryError):
            return KilnError("out of memory (fix: a host with more memory, or calibration.device: cuda)")
        if isinstance(cause, OSError) and cause.errno in _DISK_ERRORS:
            where = f"{cause.filename}: " if cause.filename else ""
            return KilnError(f"{where}{os.strerror(cause.errno)} (fix: {_DISK_ERRORS[cause.errno]}); "
                             "completed cache entries are kept, partial ones discarded")
        text = str(cause).splitlines()[0][:300] if str(cause) else type(cause).__name__
        for marker, errno_ in _DISK_MESSAGES.items():
            if marker in text:
                return KilnError(f"{text} (fix: {_DISK_ERRORS[errno_]}); completed cache entries are kept, "
                                 "partial ones discarded")
        cause = cause.__cause__ or cause.__context__
    return None


# What a full or failing disk looks like where no OSError reaches kiln (SQLite, Rust-backed writers).
_DISK_MESSAGES = {"No space left on device": errno.ENOSPC, "database or disk is full": errno.ENOSPC,
                  "disk I/O error": errno.EIO, "File too large": errno.EFBIG, "Read-only file system": errno.EROFS}
_DISK_ERRORS = {
    errno.ENOSPC: "free space on that disk, or set KILN_HOME and TMPDIR to a larger one",
    errno.EDQUOT: "free space within your quota, or set KILN_HOME and TMPDIR to another disk",
    errno.EFBIG: "the file system or a ulimit caps file size; set KILN_HOME and TMPDIR to another disk",
    errno.EROFS: "the disk is read-only; set KILN_HOME and TMPDIR to a writable one",
    errno.EACCES: "make it writable for this user, or set KILN_HOME to a folder that is",
    errno.EIO: "the disk reports I/O errors; check it, or set KILN_HOME and TMPDIR to another disk",
}
