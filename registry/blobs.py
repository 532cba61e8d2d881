"""Content-addressed file storage: every file's bytes are uploaded once, under their sha256.

A version's own run holds only its manifests (path -> sha256, size). The bytes live beside
all versions at <experiment artifact root>/blobs/<sha[:2]>/<sha>, so the tokenizer, unchanged
variants and unchanged engines cost nothing to publish again. Works the same on the embedded
store (a folder) and on a team server with proxied artifacts (mlflow-artifacts:/...).

Two publishers may upload the same blob at once: they write the same bytes. Whatever a pull
reads is verified against the manifest's sha256 before it is trusted, and a publish verifies every
blob it reuses: a stored blob whose bytes no longer match its name is uploaded again from the
publisher's own (verified) copy, so a new version is never built on a corrupt blob.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kiln.common.digest import file_sha256
from kiln.common.errors import VerificationError
from kiln.registry import tags
from kiln.registry.store import Transfer, artifact_repository, experiment_id, home_registry

BLOBS = "blobs"
STORAGE_TAG = tags.STORAGE
STORAGE = "blobs-1"        # versions without this tag hold their files in their own run
_WORKERS = 4


def _blob_store(mlflow, home: Path):
    location = mlflow.get_experiment(experiment_id(mlflow, home)).artifact_location
    return artifact_repository(home, f"{location.rstrip('/')}/{BLOBS}")


def _stored(store, shas: set[str]) -> set[str]:
    """Which of `shas` the store holds (one listing per two-hex-digit prefix)."""
    found: set[str] = set()
    for prefix in sorted({sha[:2] for sha in shas}):
        found |= {entry.path.rsplit("/", 1)[-1] for entry in store.list_artifacts(prefix) if not entry.is_dir}
    return found & shas


def _intact(store, sha: str, size: int) -> bool:
    """Whether the stored blob still holds the bytes its name promises: hashed where it lies on an embedded
    store, downloaded and hashed from a server."""
    local_root = getattr(store, "artifact_dir", None)
    if local_root is not None:
        return _file_intact(Path(local_root) / sha[:2] / sha, sha, size)
    with tempfile.TemporaryDirectory(prefix="kiln-verify-") as scratch:
        try:
            fetched = Path(store.download_artifacts(f"{sha[:2]}/{sha}", dst_path=scratch))
        except Exception:   # listed but unreadable: as good as missing
            return False
        return fetched.stat().st_size == size and file_sha256(fetched) == sha


def _file_intact(path: Path, sha: str, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size and file_sha256(path) == sha


def embedded_damage(home: Path, expected: dict[str, int]) -> list[str] | None:
    """Which blobs (sha256 -> size) $KILN_HOME's embedded store lacks or holds altered, checked without MLflow;
    None for any other registry (its blobs are verified when a publish reuses them and when pulled)."""
    if not home_registry(home):
        return None
    root = Path(home) / "registry" / "artifacts" / BLOBS
    return [sha for sha, size in sorted(expected.items()) if not _file_intact(root / sha[:2] / sha, sha, size)]


def upload_blobs(mlflow, home: Path, files: dict[str, Path], manifest_files: dict[str, dict], progress,
                 label: str) -> Transfer:
    """Upload the bytes of `files` that the store lacks or holds corrupt; returns what was sent and reused."""
    store = _blob_store(mlflow, home)
    by_sha = {manifest_files[rel]["sha256"]: path for rel, path in files.items()}
    sizes = {sha: by_sha[sha].stat().st_size for sha in by_sha}
    listed = _stored(store, set(by_sha))
    with ThreadPoolExecutor(_WORKERS) as pool:
        intact = dict(zip(sorted(listed), pool.map(lambda sha: _intact(store, sha, sizes[sha]), sorted(listed))))
    present = {sha for sha, ok in intact.items() if ok}
    missing = {sha: path for sha, path in by_sha.items() if sha not in present}
    transfer = Transfer(len(missing), sum(sizes[s] for s in missing), len(present), sum(sizes[s] for s in present),
                        repaired_files=len(listed) - len(present))
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


def download_blobs(mlflow, home: Path, manifest_files: dict[str, dict], out: Path, progress, label: str,
                   store=None) -> None:
    """Fetch each manifest entry's blob to out/<path> (from `store`, or the registry's); the caller verifies the
    tree."""
    store = store or _blob_store(mlflow, home)
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
