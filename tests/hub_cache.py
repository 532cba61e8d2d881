"""Build a Hugging Face hub cache on disk, as `snapshot_download` leaves it, for offline tests."""

from __future__ import annotations

import shutil
from pathlib import Path

COMMIT = "3f1c2a9e8b7d6c5f4e3d2c1b0a9f8e7d6c5b4a39"


def seed_hub_cache(hf_home: Path, repo_id: str, files: dict[str, Path | bytes], commit: str = COMMIT) -> Path:
    repo_dir = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        target = snapshot / name
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            shutil.copyfile(content, target)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def model_files(model_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in Path(model_dir).iterdir() if p.is_file()}
