"""Per-SM engines inside one registry version, added by separate hosts without clobbering.

Each SM has its own folder (engines/<sm>/) with its own manifest, and its own
tags on the version (kiln.sm.<sm>.*). The manifest tag is set last: a version
holds an SM only once every file and tag of it is in place. The manifest is stored
under its own digest (engines/<sm>/manifest-<sha256>.json), so two hosts adding the
same SM at once cannot leave a tag naming one manifest beside a file of the other:
the last tag wins, and the manifest and blobs it names are all there. Engines are paired
only with the checkpoint they were built from: engine.json lists its input files'
sha256, which must match the version's own manifest.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from kiln.common.errors import KilnError
from kiln.registry.manifest import MANIFEST, build_manifest, manifest_digest
from kiln.registry.blobs import STORAGE, STORAGE_TAG, Transfer, upload_blobs
from kiln.registry.run_records import RunRecords, log_records
from kiln.registry.store import ARTIFACT_PATH, PublishedVersion, client, download, upload_manifest
from kiln.registry.tags import CHECK_KEY, SM_MANIFEST, SM_PUBLISH_KEY, check_tag, held_sms, sm_tag

SM_ROOT = "engines"


class CheckpointMismatch(KilnError):
    """The version holds other checkpoint bytes than the ones an SM's artifact was built from."""


def sm_manifest(sm: str, digest: str) -> str:
    """Where the version's run keeps the SM's manifest with this digest (pulled as engines/<sm>/manifest.json)."""
    return f"{SM_ROOT}/{sm}/manifest-{digest}.json"


def add_sm(home: Path, version: PublishedVersion, sm: str, files: dict[str, Path], sm_tags: dict[str, str],
           publish_key: str, engine_record: dict, progress, records: RunRecords | None = None) -> Transfer | None:
    """Add one SM's files (artifact paths under engines/<sm>/) and tags (kiln.registry.tags.engine_tags) to
    `version`, and its `records` (metrics under <sm>/) to the version's run; None if already there."""
    mlflow = client(home)
    current = mlflow.get_model_version(version.name, version.version)
    if current.tags.get(sm_tag(sm, SM_PUBLISH_KEY)) == publish_key and sm in held_sms(current.tags):
        return None
    if current.tags.get(STORAGE_TAG) != STORAGE:
        raise KilnError(f"{version.name}/{version.version} was published before kiln's blob store and takes no "
                        "engines (fix: `kiln build` the recipe again: it publishes a new version in the blob store)")
    _check_built_from(home, version, current.source, sm, engine_record)
    scope = f"{SM_ROOT}/{sm}"
    outside = [rel for rel in files if not rel.startswith(f"{scope}/")] + \
        [key for key in sm_tags if not key.startswith(sm_tag(sm, ""))]
    if outside:
        raise KilnError(f"internal: {', '.join(outside)} is not {sm}'s")
    manifest = build_manifest(files)
    digest = manifest_digest(manifest)
    transfer = upload_blobs(mlflow, home, files, manifest["files"], progress,
                            f"upload {version.name}/{version.version} {sm}")
    upload_manifest(mlflow, version.run_id, manifest, sm_manifest(sm, digest))
    for key, value in {**sm_tags, sm_tag(sm, SM_PUBLISH_KEY): publish_key}.items():
        mlflow.set_model_version_tag(version.name, version.version, key, value)
    if records is not None:
        log_records(mlflow, version.run_id, records)
    mlflow.set_model_version_tag(version.name, version.version, sm_tag(sm, SM_MANIFEST), digest)
    return transfer


def add_runtime_check(home: Path, version: PublishedVersion, runtime: str, check_tags: dict[str, str],
                      publish_key: str, records: RunRecords | None = None) -> bool:
    """Put a runtime check's result (kiln.check.<runtime>.*) on `version` and its `records` (metrics under
    <runtime>/) on the version's run; False when this very check is there."""
    mlflow = client(home)
    current = mlflow.get_model_version(version.name, version.version)
    done = check_tag(runtime, CHECK_KEY)
    if current.tags.get(done) == publish_key:
        return False
    outside = [key for key in check_tags if not key.startswith(check_tag(runtime, ""))]
    if outside:
        raise KilnError(f"internal: {', '.join(outside)} is not {runtime}'s")
    for key, value in check_tags.items():
        mlflow.set_model_version_tag(version.name, version.version, key, value)
    if records is not None:
        log_records(mlflow, version.run_id, records)
    mlflow.set_model_version_tag(version.name, version.version, done, publish_key)   # last: the check is complete
    return True


def _check_built_from(home: Path, version: PublishedVersion, source: str, sm: str, engine_record: dict) -> None:
    """Refuse engines built from other checkpoint bytes than the version holds (its artifact at `source`)."""
    with tempfile.TemporaryDirectory(prefix="kiln-base-manifest-") as tmp:
        listed = json.loads(download(home, f"{source}/{MANIFEST}", Path(tmp)).read_text())["files"]
    differing = sorted(rel for rel, sha in engine_record["inputs"].items() if listed.get(rel, {}).get("sha256") != sha)
    if differing:
        raise CheckpointMismatch(
            f"{version.name}/{version.version} holds other bytes for {', '.join(differing[:3])} than the checkpoint "
            f"the {sm} artifact was built from (another host quantized this variant differently)"
        )


__all__ = ["SM_ROOT", "ARTIFACT_PATH", "CheckpointMismatch", "sm_tag", "sm_manifest", "held_sms", "add_sm",
           "add_runtime_check"]
