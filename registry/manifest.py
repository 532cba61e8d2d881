"""manifest.json: every file of an artifact with its size and sha256."""

from __future__ import annotations

import json
from pathlib import Path

from kiln.pipeline.digest import canonical_digest, file_sha256, list_files
from kiln.pipeline.errors import VerificationError

MANIFEST = "manifest.json"


def build_manifest(files: dict[str, Path]) -> dict:
    """`files` maps artifact-relative paths to local files."""
    return {
        "format": 1,
        "files": {rel: {"size": path.stat().st_size, "sha256": file_sha256(path)} for rel, path in sorted(files.items())},
    }


def manifest_digest(manifest: dict) -> str:
    return canonical_digest(manifest)


def verify_tree(root: Path, expected_manifest_digest: str | None = None) -> dict:
    """Check a downloaded artifact against its manifest; raise VerificationError naming the first bad file."""
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        raise VerificationError(f"{MANIFEST} is missing or unreadable: the artifact cannot be verified") from None
    if expected_manifest_digest is not None and manifest_digest(manifest) != expected_manifest_digest:
        raise VerificationError(f"{MANIFEST} was altered: its digest differs from the one recorded at publish time")
    listed = manifest.get("files", {})
    present = {p.relative_to(root).as_posix() for p in list_files(root)} - {MANIFEST}
    for rel in sorted(set(listed) - present):
        raise VerificationError(f"{rel}: listed in {MANIFEST} but missing from the artifact")
    for rel in sorted(present - set(listed)):
        raise VerificationError(f"{rel}: present in the artifact but not listed in {MANIFEST}")
    for rel in sorted(listed):
        info, path = listed[rel], root / rel
        if path.stat().st_size != info["size"]:
            raise VerificationError(f"{rel}: size {path.stat().st_size} differs from the manifest's {info['size']}")
        if file_sha256(path) != info["sha256"]:
            raise VerificationError(f"{rel}: sha256 differs from the manifest: the file was altered")
    return manifest
