"""The publish stage of a variant's checkpoint: its files, records and tags into the registry, once per key; a
cached publish is confirmed (and repaired from this build's verified cache entries) instead of published again."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from kiln import quantize, registry, validate
from kiln.common.digest import file_sha256
from kiln.common.versions import tool_versions
from kiln.pipeline.plan.stages import PUBLISHED_RECORD, StageInstance
from kiln.pipeline.run.context import BuildContext
from kiln.pipeline.run.records import size_metrics, variant_records
from kiln.pipeline.run.results import CandidateResult
from kiln.registry import tags as version_tags


class PublishStage:
    """publish(variant): `size_of(checkpoint)` gives the checkpoint's measured size (the size stage's entry)."""

    def __init__(self, context: BuildContext, size_of):
        self.context, self.size_of = context, size_of
        self.plan, self.cache, self.progress, self.loaded = context.plan, context.cache, context.progress, context.loaded

    def publish(self, name: str, instance: StageInstance, checkpoint: Path, report: Path, metrics,
                gate: validate.GateResult, candidates: list[CandidateResult] = ()) -> registry.PublishedVersion:
        home = self.plan.home
        aliases = self.loaded.recipe.publish.aliases if gate.passed else ()
        entry = self.cache.lookup("publish", instance.key)
        if entry is not None:
            recorded = json.loads((entry / PUBLISHED_RECORD).read_text())
            found = self._confirmed(recorded, instance.key, aliases, backfill=lambda version: registry.ensure_records(
                home, version, self._records(name, checkpoint, metrics),
                self._tags(name, instance, checkpoint, report, metrics, gate, candidates)))
            if found is not None and self._check_stored_version(name, found, checkpoint, report):
                return found
            if found is None:
                self.progress.log(f"warning: {recorded['name']}/{recorded['version']} is gone from the registry; "
                                  "publishing again")
            shutil.rmtree(entry, ignore_errors=True)
        tags = self._tags(name, instance, checkpoint, report, metrics, gate, candidates)
        with tempfile.TemporaryDirectory(prefix="kiln-recipe-") as scratch:
            files = self._artifact_files(name, checkpoint, report, Path(scratch))
            published = registry.publish(home, self.plan.registered_name(name), files, tags, aliases, self.progress,
                                         share_name=self.context.share_names,
                                         records=self._records(name, checkpoint, metrics))
        if published.transfer is not None and published.transfer.repaired_files:
            self.progress.log(f"warning: {published.transfer.repaired_files} stored blob(s) no longer matched their "
                              "sha256 and were uploaded again from this build's verified copy")
        if not published.created:
            self.progress.log(f"{published.name}/{published.version} already holds this checkpoint; not published again")
        elif published.transfer is not None and published.transfer.reused_files:
            sent = published.transfer
            self.progress.log(f"{published.name}/{published.version}: uploaded {sent.files} files ({sent.bytes} bytes); "
                              f"{sent.reused_files} files ({sent.reused_bytes} bytes) were already stored")
        with self.cache.write("publish", instance.key, instance.material) as out:
            (out / PUBLISHED_RECORD).write_text(json.dumps(published.as_dict(), indent=2) + "\n")
        self.context.record_ran(instance)
        return published

    def _confirmed(self, recorded: dict, publish_key: str, aliases, backfill) -> registry.PublishedVersion | None:
        """The version a cached publish recorded, if it still exists with this key (aliases set again, and
        `backfill(version)` run when kiln's run records may be missing: a version from an older kiln)."""
        home = self.plan.home
        # The common cached case is confirmed without importing MLflow (about 3 s).
        if registry.version_confirmed(home, recorded["name"], recorded["version"], publish_key, aliases,
                                      required=registry.recorded_tags()):
            return registry.PublishedVersion(recorded["name"], recorded["version"], recorded["run_id"])
        found = registry.find_version(home, recorded["name"], publish_key)
        if found is None or found.version != recorded["version"]:
            return None
        registry.set_aliases(home, found.name, found.version, aliases)
        backfill(found)
        return found

    def _records(self, name: str, checkpoint: Path, metrics: dict) -> registry.RunRecords:
        record = quantize.CheckpointRecord.load(checkpoint)
        return variant_records(self.loaded, name, record, metrics, self.size_of(checkpoint),
                               {**record.tools, **tool_versions(())})

    def _check_stored_version(self, name: str, version: registry.PublishedVersion, checkpoint: Path,
                              report: Path) -> bool:
        """A cached publish still stands on what a pull verifies: the embedded blob store is hashed against this
        build's verified cache entries, and whatever is missing or altered is uploaded again from them; a
        deleted or altered manifest.json is written again when these files reproduce its recorded digest.
        False when they do not: the version is retired (tagged kiln.unpullable) for a new one."""
        with tempfile.TemporaryDirectory(prefix="kiln-recipe-") as scratch:
            files = self._artifact_files(name, checkpoint, report, Path(scratch))
            reported = self.cache.recorded_files(report)
            recorded = {**self.cache.recorded_files(checkpoint),
                        **{published: reported[stored] for published, stored in _REPORT_FILES if stored in reported}}
            expected = {}
            for rel, path in files.items():
                info = recorded.get(rel) or {"size": path.stat().st_size, "sha256": file_sha256(path)}
                expected[info["sha256"]] = info["size"]
            damaged = registry.embedded_damage(self.plan.home, expected)
            if damaged:
                self.progress.log(f"warning: {len(damaged)} stored blob(s) of {version.name}/{version.version} are "
                                  "missing or no longer match their sha256; uploading them again from this build's "
                                  "verified copy")
                registry.repair_blobs(self.plan.home, files, self.progress)
            try:
                repaired = registry.confirm_manifest(self.plan.home, version.name, version.version, files)
            except registry.ManifestLost as lost:
                self.progress.log(f"warning: {lost}; it cannot be pulled, so it is tagged {registry.UNPULLABLE_TAG} "
                                  "and a new version is published")
                registry.retire(self.plan.home, version.name, version.version, str(lost))
                return False
            if repaired:
                self.progress.log(f"warning: {repaired}")
            return True

    def _artifact_files(self, name: str, checkpoint: Path, report: Path, scratch: Path) -> dict[str, Path]:
        """What a variant's version holds: the checkpoint, validation.json and its recipe.json (in `scratch`)."""
        files = _artifact_files(checkpoint, report)
        files[registry.RECIPE_FILE] = self._variant_recipe(name, scratch)
        return files

    def _variant_recipe(self, name: str, folder: Path) -> Path:
        """The recipe as it applies to this variant (its own variant section only): what `kiln diff` compares."""
        recipe = self.loaded.recipe.model_dump(mode="json")
        recipe["variants"] = {name: recipe["variants"][name]}
        path = folder / registry.RECIPE_FILE
        path.write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
        return path

    def _tags(self, name: str, instance: StageInstance, checkpoint: Path, report: Path, metrics: dict,
              gate: validate.GateResult, candidates: list[CandidateResult] = ()) -> dict[str, str]:
        record = quantize.CheckpointRecord.load(checkpoint)
        structure = validate.load_structure(report)
        model = self.loaded.recipe.model
        return version_tags.checkpoint_tags(
            publish_key=instance.key, recipe=self.loaded.recipe.name, recipe_digest=self.loaded.digest, variant=name,
            source=model.source if model.is_hub else f"local:{self.plan.model_digest[:16]}",
            revision=model.revision or self.plan.model_digest, quant=record.quant, kv_cache=record.kv_cache,
            backend=record.backend,
            algorithm=record.algorithm, export_quant_algo=record.export_quant_algo or "",
            group_size=str(record.group_size or ""),
            metrics={**metrics, **size_metrics(self.size_of(checkpoint))},
            tools={**record.tools, **tool_versions(())}, passed=gate.passed, failures=gate.failures,
            auto=version_tags.auto_tags(record.auto, record.layer_formats, [c.summary() for c in candidates])
            if record.auto else None, runtimes={
                runtime.value: cell.describe() for runtime, cell in quantize.runtime_cells(
                    record.quant_formats, quantize.KVCacheFormat(record.kv_cache),
                    quantize.Backend(record.backend)).items()},
            structure=version_tags.structure_tags(structure.as_dict() if structure else None, record.expert_tokens))


def _artifact_files(checkpoint: Path, report: Path) -> dict[str, Path]:
    from kiln.pipeline.plan.cache import ENTRY_FILE

    files = {p.relative_to(checkpoint).as_posix(): p for p in sorted(checkpoint.rglob("*")) if p.is_file()}
    files.pop(ENTRY_FILE, None)
    for published, stored in _REPORT_FILES:
        if (report / stored).is_file():
            files[published] = report / stored
    return files


# What a version holds of its validate entry: the metrics, the task drops where the recipe names tasks, and what
# the structure checks found.
_REPORT_FILES = (("validation.json", validate.REPORT), ("tasks.json", validate.TASKS_FILE),
                 (validate.STRUCTURE, validate.STRUCTURE))
