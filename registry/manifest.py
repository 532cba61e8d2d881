"""manifest.json: every file of an artifact with its size and sha256."""

from __future__ import annotations

import json
from pathlib import Path

from kiln.common.digest import canonical_digest, file_sha256, list_files
from kiln.common.errors import VerificationError

MANIFEST = "manifest.json"


def build_manifest(files: dict[str, Path]) -> dict:
    """`files` maps artifact-relative paths to local files."""
    return {
        "format": 1,
        "files": {rel: {"size": path.stat().st_size, "sha256": file_sha256(path)} for rel, path in sorted(files.items())},
    }


def manifest_digest(manifest: dict) -> str:
    return canonical_digest(manifest)


def verify_tree(root: Path, expected_manifest_digest: str | None = None, scope: str | None = None,
                excluded_scopes: tuple[str, ...] = ()) -> dict:
    """Check a downloaded artifact against a manifest; raise VerificationError naming the first bad file.

    The base manifest (`scope` None) covers every file outside `excluded_scopes` (the per-SM folders);
    a per-SM manifest lives at `<scope>/manifest.json` and covers exactly the files under `scope`.
    """
    root = Path(root)
    manifest_rel = MANIFEST if scope is None else f"{scope}/{MANIFEST}"
    try:
        manifest = json.loads((root / manifest_rel).read_text())
    except (OSError, ValueError):
        raise VerificationError(f"{manifest_rel} is missing or unreadable: the artifact cannot be verified") from None
    if expected_manifest_digest is not None and manifest_digest(manifest) != expected_manifest_digest:
        raise VerificationError(f"{manifest_rel} was altered: its digest differs from the one recorded at publish time")
    listed = manifest.get("files", {})
    base = root if scope is None else root / scope
    present = {p.relative_to(root).as_posix() for p in list_files(base)} if base.is_dir() else set()
    present -= {manifest_rel}
    present = {rel for rel in present if not any(rel.startswith(f"{s}/") for s in excluded_scopes)}
    for rel in sorted(set(listed) - present):
        raise VerificationError(f"{rel}: listed in {manifest_rel} but missing from the artifact")
    for rel in sorted(present - set(listed)):
        raise VerificationError(f"{rel}: present in the artifact but not listed in {manifest_rel}")
    verify_files(root, listed)
    return manifest


def verify_files(root: Path, listed: dict[str, dict], label: str = "") -> None:
    """Each listed file under `root` has the manifest's size and sha256; VerificationError names the first
    that does not (prefixed with `label`, the version, when given)."""
    prefix = f"{label}: " if label else ""
    for rel in sorted(listed):
        info, path = listed[rel], Path(root) / rel
        if path.stat().st_size != info["size"]:
            raise VerificationError(f"{prefix}{rel}: size {path.stat().st_size} differs from the manifest's "
                                    f"{info['size']}")
        if file_sha256(path) != info["sha256"]:
            raise VerificationError(f"{prefix}{rel}: sha256 differs from the manifest: the file was altered")
