"""`kiln registry verify`'s structure re-check (issue 39.4): the structure checks run again on a stored version's
files, against its source model where this host has it, changing nothing.

A version's files are verified first (registry.verify); its kiln.json and recipe.json say what the checks hold it
to, as the build did. The source is the pinned revision in this host's Hugging Face cache (never downloaded), or,
for a local source, a `--source` folder whose content digest is the one the version records.
"""

from __future__ import annotations

import json
from pathlib import Path

from kiln import quantize, registry, validate
from kiln.common.digest import tree_digest
from kiln.pipeline.plan.requests import structure_expectation

LOCAL = "local:"   # how a version names a local source (its digest's first 16 hex digits; the revision: all of it)


class StructureRecheck:
    """verify_registry's `recheck`: the structure checks of one stored version (see the module docstring)."""

    def __init__(self, sources: list[Path], progress):
        self.sources, self.progress = [Path(s) for s in sources], progress
        self._digests: dict[Path, str] = {}

    def __call__(self, tags: dict, folder: Path) -> dict:
        source, why = self._source(tags)
        if source is None:
            return {"rechecked": False, "note": why}
        if not (folder / quantize.HF_DIR).is_dir() or not (folder / "kiln.json").is_file():
            return {"rechecked": False, "note": "it holds no hf/ checkpoint with kiln.json"}
        try:
            return self._recheck(tags, folder, source)
        except Exception as exc:   # a stored file kiln cannot read as it wrote it: said, never a traceback
            said = str(exc).splitlines()[0][:160] if str(exc) else ""
            return {"rechecked": False, "note": f"its stored files could not be checked ({type(exc).__name__}: {said})"}

    def _recheck(self, tags: dict, folder: Path, source: Path) -> dict:
        record = quantize.CheckpointRecord.load(folder)
        recipe = json.loads((folder / registry.RECIPE_FILE).read_text()) if (folder / registry.RECIPE_FILE).is_file() \
            else {}
        expected = structure_expectation(record, recipe.get("calibration", {}).get("min_expert_tokens", 1),
                                         bool(recipe.get("model", {}).get("trust_remote_code", False)),
                                         tuple(recipe.get("evaluation", {}).get("allow_differences", ())))
        report = validate.check_structure(folder / quantize.HF_DIR, source, expected)
        return {"rechecked": True, "passed": report.passed, **report.as_dict(),
                "published_as_passed": tags.get(registry.tags.GATE) == "pass"}

    def _source(self, tags: dict) -> tuple[Path | None, str]:
        named, revision = tags.get(registry.tags.SOURCE, ""), tags.get(registry.tags.REVISION, "")
        if named.startswith("hf://"):
            return self._hub(named[len("hf://"):], revision)
        if named.startswith(LOCAL):
            for folder in self.sources:
                if self._digest(folder) == revision:
                    return folder, ""
            return None, (f"its source (a local folder with content digest {revision[:16]}) is not among --source "
                          f"{' '.join(map(str, self.sources)) or '(none given)'} (fix: --source FOLDER)")
        return None, "it records no source"

    def _hub(self, repo_id: str, revision: str) -> tuple[Path | None, str]:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(repo_id, revision=revision, local_files_only=True)), ""
        except Exception:   # huggingface_hub's "not in the cache" errors (LocalEntryNotFoundError and kin)
            return None, (f"its source hf://{repo_id}@{revision[:12]} is not in this host's Hugging Face cache (fix: "
                          "a build of its recipe here fetches it)")

    def _digest(self, folder: Path) -> str:
        if folder not in self._digests:
            with self.progress.task(f"digest of {folder}", total=None):
                self._digests[folder] = tree_digest(folder)
        return self._digests[folder]


def structure_line(structure: dict | None) -> str:
    """What verify prints after a version's own check."""
    if structure is None:
        return ""
    if not structure.get("rechecked"):
        return f"; structure not re-checked: {structure['note']}"
    if structure["passed"]:
        return "; structure re-checked: " + ", ".join(f"{n} {name}" for name, n in structure["checked"].items())
    problems = structure["problems"]
    return f"; structure re-checked: {len(problems)} problem{'s' if len(problems) != 1 else ''}: {problems[0]}"
