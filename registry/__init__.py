"""Registry stage: publish verified artifacts to MLflow, list them, pull them back verified.

Public entry points:
  publish(home, name, files, tags, aliases, progress) -> PublishedVersion
  find_version(home, name, publish_key) -> PublishedVersion | None
  pull(home, ref, out, progress) -> PulledArtifact
  list_versions(home) -> list[dict]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kiln.pipeline.errors import UserInputError, VerificationError
from kiln.registry.manifest import MANIFEST, build_manifest, manifest_digest, verify_tree
from kiln.registry.store import ARTIFACT_PATH, client, ensure_registered_model, experiment_id, tracking_uri

PUBLISH_KEY_TAG = "kiln.publish_key"
MANIFEST_TAG = "kiln.manifest_sha256"

__all__ = ["publish", "find_version", "pull", "list_versions", "parse_ref", "tracking_uri", "PublishedVersion"]


@dataclass(frozen=True)
class PublishedVersion:
    name: str
    version: str
    run_id: str

    def as_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "run_id": self.run_id}


@dataclass(frozen=True)
class PulledArtifact:
    name: str
    version: str
    path: Path
    files: int
    bytes: int


def publish(home: Path, name: str, files: dict[str, Path], tags: dict[str, str], aliases, progress) -> PublishedVersion:
    """Upload `files` (artifact path -> local file) plus manifest.json as a new version of `name`."""
    mlflow = client(home)
    manifest = build_manifest(files)
    run = mlflow.create_run(experiment_id(mlflow, home), run_name=name, tags={"kiln.registered_model": name})
    run_id = run.info.run_id
    total = sum(path.stat().st_size for path in files.values())
    try:
        with tempfile.TemporaryDirectory(prefix="kiln-manifest-") as tmp:
            manifest_path = Path(tmp) / MANIFEST
            manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            with progress.task(f"upload {name}", total=total) as task:
                for rel, path in sorted(files.items()):
                    folder = "/".join([ARTIFACT_PATH] + rel.split("/")[:-1])
                    mlflow.log_artifact(run_id, str(_named_as(path, rel, Path(tmp))), folder)
                    task.advance(path.stat().st_size)
                mlflow.log_artifact(run_id, str(manifest_path), ARTIFACT_PATH)
        ensure_registered_model(mlflow, name)
        version_tags = {**tags, MANIFEST_TAG: manifest_digest(manifest)}
        version = mlflow.create_model_version(
            name, source=f"{run.info.artifact_uri}/{ARTIFACT_PATH}", run_id=run_id, tags=version_tags
        )
        for alias in aliases:
            mlflow.set_registered_model_alias(name, alias, version.version)
        mlflow.set_terminated(run_id, "FINISHED")
    except BaseException:
        mlflow.set_terminated(run_id, "FAILED")
        raise
    return PublishedVersion(name, str(version.version), run_id)


def _named_as(path: Path, rel: str, scratch: Path) -> Path:
    """MLflow names an uploaded file after its local name: give it the artifact's name if they differ."""
    name = rel.rsplit("/", 1)[-1]
    if path.name == name:
        return path
    renamed = scratch / "renamed" / rel
    renamed.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(path, renamed)
    except OSError:
        shutil.copyfile(path, renamed)
    return renamed


def find_version(home: Path, name: str, publish_key: str) -> PublishedVersion | None:
    """The version of `name` that a publish with this stage key created, if it still exists."""
    mlflow = client(home)
    for version in mlflow.search_model_versions(f"name='{name}'"):
        if version.tags.get(PUBLISH_KEY_TAG) == publish_key:
            return PublishedVersion(name, str(version.version), version.run_id)
    return None


def set_aliases(home: Path, name: str, version: str, aliases) -> None:
    mlflow = client(home)
    for alias in aliases:
        mlflow.set_registered_model_alias(name, alias, version)


_REF = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._-]*)(?:@(?P<alias>[a-z0-9][a-z0-9._-]*)|/(?P<version>\d+))$")


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    match = _REF.match(ref)
    if not match:
        raise UserInputError(f"'{ref}' is not NAME@ALIAS or NAME/VERSION (fix: e.g. demo-fp8@candidate or demo-fp8/3)")
    return match["name"], match["alias"], match["version"]


def _resolve(mlflow, ref: str):
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_ref(ref)
    try:
        if alias:
            return mlflow.get_model_version_by_alias(name, alias)
        return mlflow.get_model_version(name, version)
    except MlflowException:
        what = f"alias '{alias}'" if alias else f"version {version}"
        raise UserInputError(f"{ref}: registered model '{name}' has no {what} (fix: see `kiln ls`)") from None


def pull(home: Path, ref: str, out: Path, progress) -> PulledArtifact:
    """Download a version into `out` and verify every file; nothing lands in `out` unless all match."""
    from mlflow.artifacts import download_artifacts

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"--out {out}: exists and is not empty (fix: choose a new folder)")
    mlflow = client(home)
    version = _resolve(mlflow, ref)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        with progress.task(f"download {version.name}/{version.version}", total=1) as task:
            download_artifacts(artifact_uri=version.source, dst_path=str(staging), tracking_uri=tracking_uri(home))
            task.advance()
        root = staging / ARTIFACT_PATH if (staging / ARTIFACT_PATH).is_dir() else staging
        manifest = verify_tree(root, version.tags.get(MANIFEST_TAG))
        if out.exists():
            out.rmdir()
        root.rename(out)
    except VerificationError as exc:
        raise VerificationError(f"{version.name}/{version.version}: {exc}; nothing was written to {out}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = manifest["files"]
    return PulledArtifact(version.name, str(version.version), out, len(files), sum(f["size"] for f in files.values()))


def list_versions(home: Path) -> list[dict]:
    mlflow = client(home)
    rows = []
    for model in mlflow.search_registered_models():
        aliases_by_version: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases_by_version.setdefault(str(version), []).append(alias)
        for version in sorted(mlflow.search_model_versions(f"name='{model.name}'"), key=lambda v: int(v.version)):
            tags = version.tags
            rows.append({
                "name": model.name,
                "version": str(version.version),
                "aliases": sorted(aliases_by_version.get(str(version.version), [])),
                "quant": tags.get("kiln.quant"),
                "kv_cache": tags.get("kiln.kv_cache"),
                "ppl_increase_pct": _float(tags.get("kiln.metric.ppl_increase_pct")),
                "mean_kl": _float(tags.get("kiln.metric.mean_kl")),
                "top1_agreement": _float(tags.get("kiln.metric.top1_agreement")),
                "created": version.creation_timestamp,
            })
    return rows


def _float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
