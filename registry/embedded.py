"""The embedded registry's SQLite database: created from a kept migrated copy, checked, migrated and rebased
under a lock before MLflow opens it. SQLite and files only: MLflow's migrations are handed in by
kiln.registry.store.client, the one module that imports MLflow."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from kiln.common.errors import KilnError


def open_database(database: Path, migrate: Callable[[str], None], kept: Path, experiment: str,
                  home_root: str | None) -> None:
    """Create, check and `migrate` `database` (MLflow's migrations of a database URI, which only check one that is
    current), and rebase `experiment` onto `home_root` (the current home's artifact root, for a home's own
    registry; None for one another home owns). A new database starts from a copy of `kept`, this MLflow's migrated
    empty database, and keeps one when there was none. Under a file lock: two first-time publishers would
    otherwise run MLflow's migrations at once and one fails. Later writes rely on SQLite's own locking."""
    import fcntl

    database.parent.mkdir(parents=True, exist_ok=True)
    with database.with_name(database.name + ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not database.exists():
            _create_database(database, migrate, kept)
        _require_intact(database)
        migrate(f"sqlite:///{database}")
        if home_root is not None:
            _rebase_moved_home(database, home_root, experiment)


class RegistryDamaged(KilnError):
    exit_code = 1


def _require_intact(database: Path) -> None:
    """SQLite's own consistency check, read-only, before MLflow opens (and would migrate) the database: a
    damaged one gave a traceback from every command."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)) as db:
            problems = [row[0] for row in db.execute("PRAGMA quick_check(3)")]
    except sqlite3.DatabaseError as exc:
        problems = [str(exc)]
    if problems != ["ok"]:
        raise RegistryDamaged(f"{database}: the registry database is damaged ({'; '.join(problems)[:200]}); kiln did "
                              "not change it (fix: restore it from a backup, or set MLFLOW_TRACKING_URI to another "
                              "registry; move it aside to start an empty one)")


def _create_database(database: Path, migrate: Callable[[str], None], kept: Path) -> None:
    """Migrate a new database beside its final name, then rename it into place: a full disk or a kill
    midway leaves no half-migrated database that every later command would trip over.

    MLflow's migrations (about 1.7 s) run once per MLflow schema and user: the empty migrated database is kept
    in kiln's user cache, and a new home starts from a copy of it."""
    with _scratch_beside(database) as scratch:
        copied = _copy_of_empty_database(kept, scratch, migrate)
        if copied:
            os.replace(scratch, database)
    if copied:
        return
    # A fresh name: MLflow keeps an engine per URI, which would still hold a rejected copy's deleted file.
    with _scratch_beside(database) as scratch:
        migrate(f"sqlite:///{scratch}")
        _keep_empty_database(scratch, kept)
        # MLflow's pooled connections to the scratch name stay open on the same inode and are never used
        # again (the pool is keyed by URI); renaming under them is safe.
        os.replace(scratch, database)


@contextlib.contextmanager
def _scratch_beside(database: Path):
    """An unused name beside `database` (SQLite creates the file); whatever is left under it goes afterwards."""
    fd, scratch = tempfile.mkstemp(prefix=f".tmp-{database.name}-", dir=database.parent)
    os.close(fd)
    os.unlink(scratch)
    try:
        yield Path(scratch)
    finally:
        for leftover in (scratch, scratch + "-journal", scratch + "-wal", scratch + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def _copy_of_empty_database(kept: Path, scratch: Path, migrate: Callable[[str], None]) -> bool:
    """Copy the kept empty database to `scratch`, if there is one that SQLite and MLflow both accept (a damaged
    or foreign one is dropped, and the caller migrates instead); False when there is none."""
    try:
        shutil.copyfile(kept, scratch)
    except OSError:   # none kept yet, or this home's disk refused the copy: the migrations say what they say
        return False
    try:
        _require_intact(scratch)
        migrate(f"sqlite:///{scratch}")      # MLflow's own check that the schema is its newest
        return True
    except Exception:   # damaged or foreign: dropped, and the migrations it stood for run again
        with contextlib.suppress(OSError):
            kept.unlink()
        return False


def _keep_empty_database(migrated: Path, kept: Path) -> None:
    """Keep a just-migrated, still empty database for the next new home (atomically; best effort)."""
    import sqlite3

    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=f".tmp-{kept.name}-", dir=kept.parent)
        os.close(fd)
        try:
            with contextlib.closing(sqlite3.connect(migrated)) as source, \
                    contextlib.closing(sqlite3.connect(partial)) as copy:
                source.backup(copy)     # a consistent snapshot, whatever MLflow's pool still holds open
            os.replace(partial, kept)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
    except (OSError, sqlite3.Error):
        pass   # an unwritable cache costs the next new home the migrations again, nothing else


def _rebase_moved_home(database: Path, root: str, experiment: str) -> None:
    """Point a moved or copied embedded registry at its new place.

    MLflow records absolute artifact locations. After `mv ~/.kiln /elsewhere` they would still name the
    old folder: pulls would fail and new runs would write outside $KILN_HOME. kiln's own layout puts every
    file under <home>/registry/artifacts, so the recorded prefix is replaced by the current one.
    """
    import sqlite3

    with contextlib.closing(sqlite3.connect(database, timeout=30)) as db, db:
        row = db.execute("SELECT artifact_location FROM experiments WHERE name = ?", (experiment,)).fetchone()
        if row is None or row[0] == root or not str(row[0]).endswith("/registry/artifacts"):
            return
        old = row[0]
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                              ("model_versions", "source"), ("model_versions", "storage_location")):
            if column not in {info[1] for info in db.execute(f"PRAGMA table_info({table})")}:
                continue
            db.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                       f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                       (root, len(old) + 1, old, len(old) + 1, old + "/"))
