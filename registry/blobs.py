"""Content-addressed file storage: every file's bytes are uploaded once, under their sha256.

A version's own run holds only its manifests (path -> sha256, size). The bytes live beside
all versions at <experiment artifact root>/blobs/<sha[:2]>/<sha>, so the tokenizer, unchanged
variants and unchanged engines cost nothing to publish again. Works the same on the embedded
store (a folder) and on a team server with proxied artifacts (mlflow-artifacts:/...).

Two publishers may upload the same blob at once: they write the same bytes. Whatever a pull
reads is verified against the manifest's sha256 before it is trusted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kiln.pipeline.errors import VerificationError

BLOBS = "blobs"
STORAGE_TAG = "kiln.storage"
STORAGE = "blobs-1"        # versions without this tag hold their files in their own run
_WORKERS = 4


@dataclass
class Transfer:
    """What a publish sent and what it found already stored."""

    files: int = 0
    bytes: int = 0
    reused_files: int = 0
    reused_bytes: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _blob_store(mlflow, home: Path):
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from kiln.registry.store import experiment_id, tracking_uri

    location = mlflow.get_experiment(experiment_id(mlflow, home)).artifact_location
    return get_artifact_repository(f"{location.rstrip('/')}/{BLOBS}", tracking_uri=tracking_uri(home))


def _stored(store, shas: set[str]) -> set[str]:
    """Which of `shas` the store holds (one listing per two-hex-digit prefix)."""
    found: set[str] = set()
    for prefix in sorted({sha[:2] for sha in shas}):
        found |= {entry.path.rsplit("/", 1)[-1] for entry in store.list_artifacts(prefix) if not entry.is_dir}
    return found & shas


def upload_blobs(mlflow, home: Path, files: dict[str, Path], manifest_files: dict[str, dict], progress,
                 label: str) -> Transfer:
    """Upload the bytes of `files` that the store lacks; returns what was sent and what was reused."""
    store = _blob_store(mlflow, home)
    by_sha = {manifest_files[rel]["sha256"]: path for rel, path in files.items()}
    present = _stored(store, set(by_sha))
    missing = {sha: path for sha, path in by_sha.items() if sha not in present}
    sizes = {sha: by_sha[sha].stat().st_size for sha in by_sha}
    transfer = Transfer(len(missing), sum(sizes[s] for s in missing), len(present), sum(sizes[s] for s in present))
    with tempfile.TemporaryDirectory(prefix="kiln-blobs-") as scratch, \
            progress.task(label, total=transfer.bytes) as task:
        def send(item):
            sha, path = item
            named = Path(scratch) / sha        # MLflow names an uploaded file after its local name
            try:
                os.link(path, named)
            except OSError:
                shutil.copyfile(path, named)
            store.log_artifact(str(named), sha[:2])
            task.advance(sizes[sha])

        with ThreadPoolExecutor(_WORKERS) as pool:
            list(pool.map(send, sorted(missing.items())))
    return transfer


def download_blobs(mlflow, home: Path, manifest_files: dict[str, dict], out: Path, progress, label: str) -> None:
    """Fetch each manifest entry's blob to out/<path>; the caller verifies the tree."""
    store = _blob_store(mlflow, home)
    total = sum(info["size"] for info in manifest_files.values())
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-blobs-", dir=out) as scratch, \
            progress.task(label, total=total) as task:
        def fetch(item):
            rel, info = item
            sha = info["sha256"]
            try:
                fetched = Path(store.download_artifacts(f"{sha[:2]}/{sha}", dst_path=tempfile.mkdtemp(dir=scratch)))
            except Exception as exc:  # MLflow raises its own, OSError or HTTP errors for a missing blob
                raise VerificationError(f"{rel}: listed in the manifest, but its bytes (sha256 {sha[:12]}…) are "
                                        f"missing from the registry's blob store ({type(exc).__name__})") from None
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(fetched, dest)
            task.advance(info["size"])

        with ThreadPoolExecutor(_WORKERS) as pool:
            list(pool.map(fetch, sorted(manifest_files.items())))
