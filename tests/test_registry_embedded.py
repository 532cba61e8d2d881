"""The embedded registry's database (kiln.registry.embedded): a new home starts from a copy of the migrated empty
database kept in the user cache, and a kept copy that SQLite or MLflow would refuse is dropped, never copied."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from kiln.registry import list_versions
from kiln.registry.store import _empty_database


@pytest.fixture()
def user_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "cache"


def _sql(database: Path, statement: str, *args) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        return db.execute(statement, args).fetchall()


def _new_home(tmp_path: Path, name: str) -> Path:
    """A home whose registry kiln opens (and so creates) now."""
    home = tmp_path / name
    assert list_versions(home) == []
    return home / "registry" / "mlflow.db"


def test_a_new_home_starts_from_the_kept_empty_database(tmp_path, user_cache):
    first = _new_home(tmp_path, "first")
    kept = _empty_database()
    assert kept.is_relative_to(user_cache / "kiln" / "registry")
    assert _sql(kept, "SELECT version_num FROM alembic_version") == _sql(first, "SELECT version_num FROM alembic_version")
    # Marked, the kept copy shows whether the next home was copied from it or migrated afresh.
    _sql(kept, "INSERT INTO experiment_tags (key, value, experiment_id) VALUES ('kiln.test', 'kept', 0)")
    second = _new_home(tmp_path, "second")
    assert _sql(second, "SELECT value FROM experiment_tags WHERE key = 'kiln.test'") == [("kept",)]
    assert _sql(first, "SELECT value FROM experiment_tags WHERE key = 'kiln.test'") == []


@pytest.mark.parametrize("spoil", ["damaged", "foreign schema"])
def test_a_kept_database_sqlite_or_mlflow_refuses_is_dropped_and_the_home_migrated(tmp_path, user_cache, spoil):
    _new_home(tmp_path, "first")
    kept = _empty_database()
    if spoil == "damaged":
        kept.write_bytes(kept.read_bytes()[:8192] + b"\0garbage" * 4096)
    else:   # an intact database whose schema is not this MLflow's newest
        _sql(kept, "UPDATE alembic_version SET version_num = 'not-a-revision'")
    home = _new_home(tmp_path, "second")
    assert _sql(home, "PRAGMA quick_check") == [("ok",)]
    current = _sql(home, "SELECT version_num FROM alembic_version")
    assert current != [("not-a-revision",)]
    # The migrations ran again and their result is kept in place of the spoilt copy.
    assert _sql(kept, "PRAGMA quick_check") == [("ok",)] and _sql(kept, "SELECT version_num FROM alembic_version") == current


def test_an_unwritable_user_cache_costs_the_migrations_and_nothing_else(tmp_path, user_cache):
    user_cache.write_text("a file where the cache folder would go")
    for name in ("first", "second"):
        database = _new_home(tmp_path, name)
        assert _sql(database, "SELECT name FROM experiments") == [("Default",)]
    assert user_cache.read_text() == "a file where the cache folder would go"
