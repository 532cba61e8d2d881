"""Atomic writes: readers never see a half-written file or folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a temporary folder beside dest; rename it to dest only if the block succeeds.

    If dest appeared meanwhile (a concurrent writer finished first), ours is
    discarded: both wrote the same content-addressed result.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def require_empty_folder(path: Path, option: str = "--out") -> Path:
    """A destination that is new or an empty folder; anything else is the user's to resolve."""
    from kiln.pipeline.errors import UserInputError

    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserInputError(f"{option} {path}: exists and is not empty (fix: choose a new folder)")
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
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
