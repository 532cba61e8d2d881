"""Atomic writes: readers never see a half-written file or folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from kiln.common.errors import KilnError


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a temporary folder beside dest; rename it to dest only if the block succeeds.

    If dest appeared meanwhile (a concurrent writer finished first), ours is
    discarded: both wrote the same content-addressed result.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    from kiln.common.scratch import owner_token

    # The owner token lets the next build tell a dead writer's leftovers from a running one's.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-{owner_token()}-", dir=dest.parent))
    try:
        try:
            yield tmp
        except Exception as exc:
            # Writers deep in torch or ModelOpt report a full disk as "iostream error" and the like; what
            # the disk looks like right now, before the partial folder is removed, says what happened.
            if not isinstance(exc, KilnError) and free_bytes(tmp) < _NEARLY_FULL:
                raise DiskFull(dest) from exc
            raise
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_NEARLY_FULL = 16 * 2**20


def free_bytes(path: Path) -> int:
    try:
        stats = os.statvfs(path)
    except OSError:
        return 2**62
    return stats.f_bavail * stats.f_frsize


class DiskFull(KilnError):
    def __init__(self, dest: Path):
        super().__init__(f"{dest.parent}: no space left on device while writing {dest.name}; the partial "
                         "folder was discarded and completed cache entries are kept (fix: free space on that disk, "
                         "or set KILN_HOME to a larger one)")


def require_empty_folder(path: Path, option: str = "--out") -> Path:
    """A destination that is new or an empty folder; anything else is the user's to resolve."""
    from kiln.common.errors import UserInputError

    path = Path(path)
    try:
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserInputError(f"{option} {path}: exists and is not empty (fix: choose a new folder)")
        if not path.exists():   # can it be created? Probe now rather than fail after the download
            path.mkdir(parents=True)
            path.rmdir()
    except OSError as exc:
        raise UserInputError(f"{option} {path}: cannot create a folder there ({exc.strerror}) "
                             "(fix: choose a writable location)") from None
    return path


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes it private; the file is for others to read
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
