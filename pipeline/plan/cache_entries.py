"""What the stage cache holds, who still needs it, and pruning it safely (`kiln cache ls`, `kiln cache prune`).

An entry is needed by a published version when that version's publish entry names it among its inputs
(directly or through another entry: publish <- checkpoint, report; the size entry shares the checkpoint's key);
`kiln build` republishes and repairs a version's blobs from those. A build in progress holds every key of its
plan (StageCache.hold); prune never removes a held entry. Removal renames the entry to a temporary name first (the
entry disappears whole, or not at all) and then deletes it; a prune killed between the two leaves a temporary
folder that the next build removes, never half an entry.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from kiln.pipeline.plan.cache import ENTRY_FILE, RESUME, StageCache, held_keys

PUBLISHED_FILE = "published.json"   # what the publish stage records: the registry version it created


@dataclass
class CacheEntry:
    stage: str
    key: str
    path: Path
    size: int
    created: float
    last_used: float
    inputs: dict[str, str]                                     # input name -> key, from the entry's material
    published: tuple[str, str] | None                          # (name, version) a publish entry created
    versions: set[tuple[str, str]] = field(default_factory=set)  # published versions that need this entry
    recipes: set[str] = field(default_factory=set)

    def document(self) -> dict:
        return {"stage": self.stage, "key": self.key, "size": self.size, "created": self.created,
                "last_used": self.last_used, "versions": [f"{n}/{v}" for n, v in sorted(self.versions)],
                "recipes": sorted(self.recipes)}


def cache_entries(root: Path) -> list[CacheEntry]:
    """Every complete entry (its kiln-entry.json readable), oldest use first; partial writes are not entries."""
    found = []
    for stage_dir in sorted(p for p in Path(root).glob("*") if p.is_dir() and not p.name.startswith(".")):
        for entry in sorted(p for p in stage_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:   # what a damaged or foreign folder holds is not an entry (a build discards it on lookup)
                record = json.loads((entry / ENTRY_FILE).read_text())
                published = json.loads((entry / PUBLISHED_FILE).read_text()) if (entry / PUBLISHED_FILE).is_file() \
                    else None
                used = entry.stat().st_mtime
                inputs = {name: value for name, value in record.get("material", {}).get("input_digests", {}).items()
                          if isinstance(value, str)}
                found.append(CacheEntry(
                    stage_dir.name, entry.name, entry, sum(int(f["size"]) for f in record.get("files", {}).values()),
                    float(record.get("created", used)), used, inputs,
                    (published["name"], str(published["version"])) if published else None))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
    return sorted(found + _resume_folders(root), key=lambda e: (e.last_used, e.stage, e.key))


def _resume_folders(root: Path) -> list[CacheEntry]:
    """What killed builds left to resume from (`<stage> (resume)`): listed and pruned like entries, needed by no
    published version, held while a build of that key runs."""
    found = []
    for folder in sorted(p for p in Path(root, RESUME).glob("*/*") if p.is_dir() and not p.name.startswith(".")):
        with contextlib.suppress(OSError):
            files = [f for f in folder.rglob("*") if f.is_file()]
            used = max([f.stat().st_mtime for f in files] or [folder.stat().st_mtime])
            found.append(CacheEntry(f"{folder.parent.name} (resume)", folder.name, folder,
                                    sum(f.stat().st_size for f in files), folder.stat().st_mtime, used, {}, None))
    return found


def mark_references(entries: list[CacheEntry], versions: dict[tuple[str, str], str | None]) -> None:
    """Fill each entry's `versions` and `recipes`: those of the published versions (in `versions`, with their
    recipe) whose publish entry reaches it through inputs."""
    by_key: dict[str, list[CacheEntry]] = {}
    for entry in entries:
        by_key.setdefault(entry.key, []).append(entry)
    for entry in entries:
        if entry.published is None or entry.published not in versions:
            continue
        recipe, todo, seen = versions[entry.published], [entry.key], set()
        while todo:
            key = todo.pop()
            if key in seen:
                continue
            seen.add(key)
            for needed in by_key.get(key, ()):
                needed.versions.add(entry.published)
                if recipe:
                    needed.recipes.add(recipe)
                todo += needed.inputs.values()


@dataclass(frozen=True)
class PruneRules:
    older_than_s: float | None = None    # unused for longer than this
    max_size: int | None = None          # then the least recently used go until the cache fits
    keep_referenced: bool = True         # never an entry a published version needs


def choose(entries: list[CacheEntry], rules: PruneRules, held: set[str], now: float | None = None) -> list[CacheEntry]:
    """The entries to remove, least recently used first; never a held one, nor (unless asked) a referenced one."""
    now = time.time() if now is None else now
    removable = [e for e in entries if e.key not in held and not (rules.keep_referenced and e.versions)]
    chosen = [e for e in removable if rules.older_than_s is not None and now - e.last_used > rules.older_than_s]
    if rules.max_size is not None:
        total = sum(e.size for e in entries) - sum(e.size for e in chosen)
        for entry in removable:
            if total <= rules.max_size:
                break
            if entry not in chosen:
                chosen.append(entry)
                total -= entry.size
    return sorted(chosen, key=lambda e: (e.last_used, e.stage, e.key))


def remove_entry(cache: StageCache, entry: CacheEntry) -> bool:
    """Remove one entry unless a build holds it; False when it was held (or is gone). The entry is renamed away
    first and the holds read again after: a build that took its hold before the rename gets its entry back; one
    that looks it up after finds it missing and builds it again, as for any missing entry."""
    from kiln.common.scratch import owner_token

    tombstone = entry.path.parent / f".tmp-prune-{entry.key[:12]}-{owner_token()}-x"
    try:
        os.rename(entry.path, tombstone)
    except FileNotFoundError:
        return False
    if entry.key in held_keys(cache.root):
        try:
            os.rename(tombstone, entry.path)   # only over a missing path: a rebuilt entry stays
            return False
        except OSError:
            pass
    shutil.rmtree(tombstone, ignore_errors=True)
    return True
