"""A version confirmed by a cached rebuild is one a pull can verify: its stored manifest.json matches the
digest in its tags. A deleted or altered manifest is written again from the build's verified files when
they reproduce that digest; otherwise the caller publishes a new version.

Both the embedded registry and a team server are read without importing MLflow (the cached build's fast
path, through kiln.registry.lookup's rows); MLflow decides whatever that path cannot.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from kiln.common.errors import KilnError, VerificationError
from kiln.registry.lookup import version_row
from kiln.registry.manifest import MANIFEST, build_manifest, manifest_digest
from kiln.registry.store import (
    MANIFEST_TAG, PUBLISH_KEY_TAG, artifact_root, client, download_file, home_registry, is_missing, tracking_uri,
    upload_manifest,
)


def stored_manifest(home: Path, name: str, version: str) -> tuple[dict | None, str | None, str, str]:
    """(the stored manifest, None when missing or unreadable; the digest the version's tags record; its run id;
    why it is unreadable)."""
    found = _stored_without_mlflow(home, name, version)
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


def _stored_without_mlflow(home: Path, name: str, version: str):
    """stored_manifest's answer read without importing MLflow (about 3 s of a cached build): the version's row
    (kiln.registry.lookup), then its manifest from the embedded folder or a server's proxied artifacts.
    None when anything is not as expected: MLflow then decides."""
    import urllib.error
    import urllib.parse
    import urllib.request

    row = version_row(home, name, version)
    if row is None or not row.tags:
        return None
    digest, source = row.tags.get(MANIFEST_TAG), row.source
    try:
        if source.startswith("file://"):
            # A copied home's database still names the old home's files until MLflow's client rebases it: nothing
            # outside KILN_HOME may confirm a version (a manifest deleted in the copy would read as present).
            if home_registry(home) and not (source + "/").startswith(artifact_root(home) + "/"):
                return None
            text = (Path(source[len("file://"):]) / MANIFEST).read_text()
        elif source.startswith("mlflow-artifacts:/") and tracking_uri(home).startswith(("http://", "https://")):
            path = urllib.parse.quote(f"{source[len('mlflow-artifacts:/'):].strip('/')}/{MANIFEST}")
            url = f"{tracking_uri(home).rstrip('/')}/api/2.0/mlflow-artifacts/artifacts/{path}"
            try:
                with urllib.request.urlopen(url, timeout=20) as answer:
                    text = answer.read().decode()
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    return None
                raise FileNotFoundError(url) from None
        else:
            return None
    except FileNotFoundError:
        return None, digest, row.run_id, "missing"
    except OSError:
        return None   # a server that did not answer: MLflow decides, and reports it
    try:
        return json.loads(text), digest, row.run_id, ""
    except ValueError:
        return None, digest, row.run_id, "unreadable"


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
