"""Atomic writes: readers never see a half-written file or folder."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from kiln.common.errors import KilnError, UserInputError


@contextlib.contextmanager
def atomic_dir(dest: Path, shared: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside dest; rename it to dest only if the block succeeds.

    shared (content-addressed results): if dest appeared meanwhile, a concurrent writer finished first
    and ours is discarded, both wrote the same thing. Not shared (a user's --out): dest must still be
    missing or an empty folder when ours lands; another writer's files there are an error, never success.
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
            os.rename(tmp, dest)   # over a missing path or an empty folder only: never over another's files
        except OSError as exc:
            if not shared:
                raise OutTaken(dest, exc) from None
            if not dest.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_NEARLY_FULL = 16 * 2**20


def build_once(dest: Path, fill: Callable[[Path], None], done: Callable[[Path], bool]) -> Path:
    """A folder built once and then shared by processes that may already use it: unless `done(dest)`,
    `fill(staging)` builds it beside `dest` and a rename puts it in place; when another process got there
    first, its folder stays and this one is dropped."""
    if done(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        fill(staging)
        with contextlib.suppress(OSError):   # another process made it first
            staging.rename(dest)              # atomic
    finally:
        shutil.rmtree(staging, ignore_errors=True)   # gone after a rename; a failed build's leftovers otherwise
    return dest


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


class OutTaken(KilnError):
    def __init__(self, dest: Path, exc: OSError):
        super().__init__(f"{dest}: another writer put files there while this one ran ({exc.strerror}); nothing of "
                         "this run was written there (fix: choose a new folder, one --out per command)")


def require_empty_folder(path: Path, option: str = "--out") -> Path:
    """A destination that is new or an empty folder, as an absolute path with its links resolved (the
    rename that lands the result must replace the folder a link names, not the link)."""
    from kiln.common.errors import UserInputError

    path = Path(os.path.realpath(path))
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


def user_cache(*parts: str) -> Path:
    """$XDG_CACHE_HOME/kiln/... (~/.cache/kiln/...): what kiln derives once per user and can always derive again."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").joinpath("kiln", *parts)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace a regular file (or create one) atomically. A link is followed to the file it names; a
    character device or a pipe (/dev/stdout, /dev/null, a FIFO) is written through, as a stream; any other
    kind of file is refused: the rename would replace the device node or socket itself."""
    path = Path(path)
    kind = _existing_kind(path)
    if kind in ("device", "pipe"):
        with _open_stream(path, kind) as stream:
            stream.write(text)
        return
    if kind is not None and kind != "file":
        from kiln.common.errors import UserInputError

        raise UserInputError(f"{path}: is a {kind}, not a regular file; kiln replaces files atomically and will not "
                             "replace it (fix: name a regular file or a new path)")
    path = Path(os.path.realpath(path))
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


FIFO_READER_WAIT_S = 10.0


def _open_stream(path: Path, kind: str):
    """A device, or a FIFO once a reader has it open: opening a FIFO nobody reads blocks forever, so it is opened
    without blocking, retried for FIFO_READER_WAIT_S, then refused."""
    if kind != "pipe":
        return open(path, "w", encoding="utf-8")
    deadline = time.monotonic() + FIFO_READER_WAIT_S
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO:   # ENXIO: no reader yet
                raise
            if time.monotonic() >= deadline:
                raise UserInputError(f"{path}: is a FIFO that nobody read within {FIFO_READER_WAIT_S:g} s (fix: start "
                                     "its reader first, or name a regular file)") from None
            time.sleep(0.1)
    os.set_blocking(fd, True)   # a reader is there: write as a stream
    return os.fdopen(fd, "w", encoding="utf-8")


def _existing_kind(path: Path) -> str | None:
    """What the path names once links are followed: None when nothing (and it is no dangling link)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "link to nothing" if os.path.islink(path) else None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISCHR(mode):
        return "device"
    if stat.S_ISFIFO(mode):
        return "pipe"
    return {stat.S_IFDIR: "folder", stat.S_IFBLK: "block device", stat.S_IFSOCK: "socket"}.get(stat.S_IFMT(mode),
                                                                                              "special file")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
