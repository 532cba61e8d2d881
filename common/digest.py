"""Content digests: canonical JSON of configs, sha256 of files and folders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the same value always gives the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(root: Path) -> list[Path]:
    """Every regular file under root (following symlinked roots), sorted by relative path."""
    root = Path(root)
    return sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def tree_manifest(root: Path, exclude: set[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} for every file under root."""
    root = Path(root)
    manifest = {}
    for path in list_files(root):
        rel = path.relative_to(root).as_posix()
        if rel in exclude:
            continue
        manifest[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return manifest


def tree_digest(root: Path, exclude: set[str] = frozenset()) -> str:
    """One digest for a folder's content: paths and bytes, not timestamps."""
    return canonical_digest(tree_manifest(root, exclude))
