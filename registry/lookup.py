"""Read-only registry look-ups that do not import MLflow: the cached-rebuild path.

Importing MLflow costs about 3 s, which was most of a fully cached `kiln build`. Confirming that a
version still exists, still carries its publish key (and kiln's run records) and already holds the
recipe's aliases needs a few rows, so this module reads them directly: from the embedded SQLite database (MLflow's own
tables `model_versions`, `model_version_tags`, `registered_model_aliases`), or from a team server
through MLflow's documented REST API. Any surprise (a schema MLflow changed, a server that does
not answer) is "unknown", and the caller falls back to the MLflow client: this path may only
ever save time, never decide differently.
"""

from __future__ import annotations

import json
import sqlite3
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from kiln.registry.store import PUBLISH_KEY_TAG, is_embedded, tracking_uri

_DELETED = "Deleted_Internal"   # MLflow marks soft-deleted versions with this stage


def version_confirmed(home: Path, name: str, version: str, publish_key: str, aliases,
                      required: Mapping[str, str] | None = None) -> bool | None:
    """True: `name/version` exists with this publish key, carries the `required` tags, and every alias already
    points at it. False: it is gone or carries another key. None: not known without MLflow (aliases to move
    or tags to add included)."""
    found = _version(home, name, version, aliases)
    if found is None:
        return None
    tags, alias_versions = found
    if tags.get(PUBLISH_KEY_TAG, "") != publish_key:
        return False
    if any(tags.get(key) != value for key, value in (required or {}).items()):
        return None
    return True if all(alias_versions.get(a) == str(version) for a in aliases) else None


def version_tag(home: Path, name: str, version: str, key: str) -> str | None:
    """One tag of `name/version`; None when it is unset, the version is gone, or it is not known without MLflow."""
    found = _version(home, name, version, ())
    return None if found is None else found[0].get(key)


@dataclass(frozen=True)
class VersionRow:
    tags: dict[str, str]       # {} when the version is gone
    aliases: dict              # alias -> the version it points at (None: elsewhere or unset), for those asked
    source: str = ""           # where its artifact lives (file://… embedded, mlflow-artifacts:/… on a server)
    run_id: str = ""


def version_row(home: Path, name: str, version: str, aliases=()) -> VersionRow | None:
    """The version as the registry stores it, read without MLflow; None when that is not known so."""
    uri = tracking_uri(home)
    try:
        if is_embedded(uri):
            return _from_sqlite(Path(uri[len("sqlite:///"):]), name, version, aliases)
        return _from_server(uri, name, version, aliases)
    except (OSError, sqlite3.Error, ValueError, KeyError):
        return None


def _version(home: Path, name: str, version: str, aliases) -> tuple[dict[str, str], dict] | None:
    """(the version's tags, {} when it is gone; where each alias points), or None when unknown."""
    row = version_row(home, name, version, aliases)
    return None if row is None else (row.tags, row.aliases)


def _from_sqlite(database: Path, name: str, version: str, aliases) -> VersionRow | None:
    if not database.is_file():
        return None
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as db:
        row = db.execute("SELECT current_stage, source, run_id FROM model_versions WHERE name = ? AND version = ?",
                         (name, int(version))).fetchone()
        if row is None or row[0] == _DELETED:
            return VersionRow({}, {})   # gone: no key matches
        tags = dict(db.execute("SELECT key, value FROM model_version_tags WHERE name = ? AND version = ?",
                               (name, int(version))))
        alias_versions = {alias: str(v) for alias, v in db.execute(
            "SELECT alias, version FROM registered_model_aliases WHERE name = ?", (name,))}
    return VersionRow(tags, {a: alias_versions.get(a) for a in aliases}, row[1] or "", row[2] or "")


def _from_server(uri: str, name: str, version: str, aliases) -> VersionRow | None:
    base = uri.rstrip("/") + "/api/2.0/mlflow"
    query = urllib.parse.urlencode({"name": name, "version": version})
    try:
        with urllib.request.urlopen(f"{base}/model-versions/get?{query}", timeout=10) as response:
            document = json.load(response)["model_version"]
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return VersionRow({}, {})
        return None
    if document.get("current_stage") == _DELETED:
        return VersionRow({}, {})
    tags = {t["key"]: t["value"] for t in document.get("tags", [])}
    alias_versions = {a: version for a in document.get("aliases", [])}
    return VersionRow(tags, {a: alias_versions.get(a) for a in aliases}, document.get("source", ""),
                      document.get("run_id", ""))
