"""A version confirmed by a cached rebuild is one a pull can verify: its stored manifest.json matches the
digest in its tags. A deleted or altered manifest is written again from the build's verified files when
they reproduce that digest; otherwise the caller publishes a new version.

The embedded registry is read without importing MLflow (the cached build's fast path); a team server's
manifest is downloaded through MLflow.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from pathlib import Path

from kiln.common.errors import KilnError, VerificationError
from kiln.registry.manifest import MANIFEST, build_manifest, manifest_digest
from kiln.registry.store import (
    MANIFEST_TAG, PUBLISH_KEY_TAG, client, download_file, home_registry, is_missing, tracking_uri, upload_manifest,
)


def stored_manifest(home: Path, name: str, version: str) -> tuple[dict | None, str | None, str, str]:
    """(the stored manifest, None when missing or unreadable; the digest the version's tags record; its run id;
    why it is unreadable)."""
    found = _embedded(home, name, version) if home_registry(home) else _served(tracking_uri(home), name, version)
    if found is not None:
        return found
    stored = client(home).get_model_version(name, version)
    with tempfile.TemporaryDirectory(prefix="kiln-manifest-") as scratch:
        manifest, trouble = _download_json(home, f"{stored.source}/{MANIFEST}", Path(scratch) / MANIFEST)
    return manifest, stored.tags.get(MANIFEST_TAG), stored.run_id, trouble


def _download_json(home: Path, uri: str, dest: Path) -> tuple[dict | None, str]:
    """(the stored JSON document, "") or (None, "missing" | "unreadable")."""
    try:
        return json.loads(download_file(home, uri, dest).read_text()), ""
    except ValueError:
        return None, "unreadable"
    except Exception as exc:   # MLflow's "No such artifact", a missing run folder
        if not (is_missing(exc) or isinstance(exc, OSError) or "No such" in str(exc)):
            raise
        return None, "missing"


def fetch_manifest(home: Path, source: str, stored: str, digest: str | None, dest: Path, shown: str) -> dict:
    """A version's manifest (at `source`/`stored`), saved as `dest`, after its digest was checked against the
    one its tags record: no file a manifest lists is trusted unless the manifest itself is. `shown` names it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    manifest, trouble = _download_json(home, f"{source}/{stored}", dest)
    if trouble == "missing":
        raise VerificationError(f"{shown} is missing from the registry, so no file can be verified (fix: rebuild "
                                "its recipe with `kiln build`, which writes it again, or pull another version)")
    if manifest is None or manifest_digest(manifest) != digest:   # altered: it must not direct any download
        raise VerificationError(f"{shown} was altered: its digest differs from the one recorded at publish time")
    return manifest


def _served(uri: str, name: str, version: str):
    """A team server's version and its proxied manifest through MLflow's REST API (no MLflow import, about 3 s
    of a cached build); None when anything is not as expected: MLflow then decides."""
    import urllib.error
    import urllib.parse
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return None
    base = uri.rstrip("/")
    query = urllib.parse.urlencode({"name": name, "version": version})
    try:
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/model-versions/get?{query}", timeout=20) as answer:
            document = json.load(answer)["model_version"]
        source, run_id = document["source"], document["run_id"]
        digest = {t["key"]: t["value"] for t in document.get("tags", [])}.get(MANIFEST_TAG)
        if not source.startswith("mlflow-artifacts:/"):
            return None
        path = urllib.parse.quote(f"{source[len('mlflow-artifacts:/'):].strip('/')}/{MANIFEST}")
        try:
            with urllib.request.urlopen(f"{base}/api/2.0/mlflow-artifacts/artifacts/{path}", timeout=20) as answer:
                return json.loads(answer.read()), digest, run_id, ""
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                return None
            return None, digest, run_id, "missing"
        except ValueError:
            return None, digest, run_id, "unreadable"
    except (OSError, ValueError, KeyError):
        return None


def _embedded(home: Path, name: str, version: str):
    database = Path(tracking_uri(home)[len("sqlite:///"):])
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as db:
            source, run_id = db.execute("SELECT source, run_id FROM model_versions WHERE name = ? AND version = ?",
                                        (name, int(version))).fetchone()
            (digest,) = db.execute("SELECT value FROM model_version_tags WHERE name = ? AND version = ? AND key = ?",
                                   (name, int(version), MANIFEST_TAG)).fetchone() or (None,)
    except (sqlite3.Error, TypeError, ValueError):
        return None   # MLflow decides
    if not source.startswith("file://"):
        return None
    path = Path(source[len("file://"):]) / MANIFEST
    try:
        return json.loads(path.read_text()), digest, run_id, ""
    except FileNotFoundError:
        return None, digest, run_id, "missing"
    except (OSError, ValueError):
        return None, digest, run_id, "unreadable"


def confirm_manifest(home: Path, name: str, version: str, files: dict[str, Path]) -> str | None:
    """None when the stored manifest matches its recorded digest; after a repair, what was repaired.
    Raises ManifestLost when the build's files do not reproduce the recorded digest (publish anew)."""
    manifest, digest, run_id, trouble = stored_manifest(home, name, version)
    if manifest is not None and manifest_digest(manifest) == digest:
        return None
    what = f"its {MANIFEST} was {trouble}" if manifest is None else f"its {MANIFEST} was altered"
    rebuilt = build_manifest(files)
    if manifest_digest(rebuilt) != digest:
        raise ManifestLost(f"{name}/{version}: {what}, and this build's files do not reproduce the digest its tags "
                           "record")
    try:
        upload_manifest(client(home), run_id, rebuilt, MANIFEST)
    except Exception as exc:   # the run itself was deleted: the version cannot be repaired in place
        raise ManifestLost(f"{name}/{version}: {what}, and its run cannot take it again ({str(exc)[:120]})") from None
    return f"{name}/{version}: {what}; wrote it again from this build's verified files (its digest matches the tags)"


class ManifestLost(KilnError):
    """A version a pull cannot verify, and that this build cannot repair in place."""


UNPULLABLE_TAG = "kiln.unpullable"


def retire(home: Path, name: str, version: str, reason: str) -> None:
    """Take a version that cannot be pulled out of its publish key's reach (a new publish then creates a
    new version, and the aliases move to it); it stays in the registry, tagged with why."""
    mlflow = client(home)
    key = mlflow.get_model_version(name, version).tags.get(PUBLISH_KEY_TAG, "")
    mlflow.set_model_version_tag(name, version, PUBLISH_KEY_TAG, f"retired:{key}")
    mlflow.set_model_version_tag(name, version, UNPULLABLE_TAG, reason[:4000])
