"""The content-addressed stage cache.

An entry lives at `<root>/<stage>/<key>/`. It is written into a temporary
folder beside it and renamed into place only when complete, with
`kiln-entry.json` (the key material and a manifest of every file) written
last inside it. An entry without that file, or whose files no longer match
their recorded sizes and sha256, is not an entry: it is discarded with a
warning and the stage runs again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from kiln.common.digest import canonical_digest, file_sha256, tree_manifest
from kiln.common.fsutil import atomic_dir

ENTRY_FILE = "kiln-entry.json"
HOLDS = ".holds"   # <root>/.holds/<owner>.json: the keys a running build uses (kiln cache prune leaves them)
RESUME = ".resume"   # <root>/.resume/<stage>/<key>/: what a killed stage instance resumes from


def held_keys(root: Path) -> set[str]:
    """The keys every build still running holds; a dead build's hold file is ignored (and removed)."""
    from kiln.common.scratch import owner_alive

    held: set[str] = set()
    for hold in Path(root, HOLDS).glob("*.json"):
        if not owner_alive(hold.stem):
            with contextlib.suppress(OSError):
                hold.unlink()
            continue
        with contextlib.suppress(OSError, ValueError):
            held.update(json.loads(hold.read_text()))
    return held


def stage_key(stage: str, stage_version: int, config: dict, input_digests: dict, tools: dict) -> tuple[str, dict]:
    """(key, material): key = sha256 of the canonical JSON of the material."""
    material = {
        "stage": stage,
        "stage_version": stage_version,
        "config": config,
        "input_digests": input_digests,
        "tools": tools,
    }
    return canonical_digest(material), material


@dataclass
class StageCache:
    root: Path
    warn: Any = print
    # Entries this process hashed and found intact: `kiln build` verifies in its plan, then looks up.
    _verified: set = field(default_factory=set, repr=False)

    def entry_dir(self, stage: str, key: str) -> Path:
        return Path(self.root) / stage / key

    def resume_dir(self, stage: str, key: str) -> Path:
        """Where a stage instance keeps what a killed run of it resumes from (a calibration's finished layers):
        outside the entries, removed when the entry is written, and by `kiln cache prune` when no build holds it."""
        return Path(self.root) / RESUME / stage / key

    def lookup(self, stage: str, key: str) -> Path | None:
        """The entry's folder if complete and intact; a damaged entry is removed."""
        entry = self.entry_dir(stage, key)
        if not entry.is_dir():
            return None
        problem = self._problem(entry)
        if problem is None:
            with contextlib.suppress(OSError):
                os.utime(entry)   # its last use, for `kiln cache ls` and `prune --older-than`
            return entry
        self._verified.discard(entry)
        self.warn(f"warning: cache entry {stage}/{key[:12]} is damaged ({problem}); discarding and rebuilding")
        shutil.rmtree(entry, ignore_errors=True)
        return None

    def intact(self, stage: str, key: str) -> bool:
        """Whether a complete entry with intact files exists, hashed as lookup does, but never removed
        (for `kiln plan`, which writes nothing): a damaged one is reported and counts as missing."""
        entry = self.entry_dir(stage, key)
        if not entry.is_dir():
            return False
        problem = self._problem(entry)
        if problem is not None:
            self.warn(f"warning: cache entry {stage}/{key[:12]} is damaged ({problem}); a build discards it and "
                      "runs the stage again")
        return problem is None

    @staticmethod
    def recorded_files(entry: Path) -> dict[str, dict]:
        """{relative path: {size, sha256}} as recorded when the entry was written (verified by lookup)."""
        return json.loads((Path(entry) / ENTRY_FILE).read_text())["files"]

    def _problem(self, entry: Path) -> str | None:
        if entry in self._verified:
            return None
        problem = self._hash_problem(entry)
        if problem is None:
            self._verified.add(entry)
        return problem

    @staticmethod
    def _hash_problem(entry: Path) -> str | None:
        try:
            record = json.loads((entry / ENTRY_FILE).read_text())
        except (OSError, ValueError):
            return f"no readable {ENTRY_FILE}"
        for rel, info in record.get("files", {}).items():
            path = entry / rel
            if not path.is_file():
                return f"{rel} is missing"
            if path.stat().st_size != info["size"] or file_sha256(path) != info["sha256"]:
                return f"{rel} was altered"
        return None

    @contextlib.contextmanager
    def write(self, stage: str, key: str, material: dict) -> Iterator[Path]:
        """Yield a temporary folder to fill; on success it becomes the entry, atomically."""
        dest = self.entry_dir(stage, key)
        with atomic_dir(dest) as tmp:
            yield tmp
            record = {"key": key, "material": material, "created": time.time(), "files": tree_manifest(tmp)}
            (tmp / ENTRY_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            os.chmod(tmp, 0o755)

    def get_or_build(self, stage: str, key: str, material: dict, build: Callable[[Path], None]) -> tuple[Path, bool]:
        """(entry, whether it was built now): the intact entry, or `build(folder)` into a temporary folder
        that becomes the entry only when build returns."""
        entry = self.lookup(stage, key)
        if entry is not None:
            return entry, False
        with self.write(stage, key, material) as out:
            build(out)
        return self.entry_dir(stage, key), True

    @contextlib.contextmanager
    def hold(self, keys) -> Iterator[None]:
        """While the block runs, `kiln cache prune` removes none of these entries (a build holds its plan's)."""
        from kiln.common.fsutil import atomic_write_text
        from kiln.common.scratch import owner_token

        path = Path(self.root, HOLDS, f"{owner_token()}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(sorted(set(keys))) + "\n")
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()

    def clean_stale_temporaries(self, older_than_s: float = 24 * 3600) -> int:
        """Remove partial entries of builds that no longer run (never mistaken for entries); those whose
        writer cannot be told (older kiln versions) once they are a day old. A writer on another host sharing
        this home (a node of a distributed calibration) may run still: kept while it is under a week old."""
        from kiln.common.scratch import owner_alive, owner_in

        removed = 0
        now = time.time()
        for tmp in [*Path(self.root).glob("*/.tmp-*"), *Path(self.root, RESUME).glob("*/.tmp-*")]:
            owner = owner_in(tmp.name)
            with contextlib.suppress(OSError):
                age = now - tmp.stat().st_mtime
                if (not owner_alive(owner) if owner is not None else age > older_than_s) or age > 7 * older_than_s:
                    shutil.rmtree(tmp)
                    removed += 1
        return removed
