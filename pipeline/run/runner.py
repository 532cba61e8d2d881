"""Run a plan: each stage instance whose entry is missing runs into the cache.

Stages meet only through their cache entries on disk: quantize writes hf/,
trtllm/ and kiln.json; validate reads hf/ and writes report.json; publish
uploads those files and records the registry version it created. On a GPU
host, compile writes engines/<sm>/, the engine check measures it, and its
publish adds that SM's folder to the variant's version (run/targets.py, with
the vLLM check). A build ends by logging the accuracy-against-size figure on
every published variant's run.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from kiln import quantize, registry, validate
from kiln.common.digest import canonical_digest, file_sha256
from kiln.common.errors import UserInputError
from kiln.common.progress import ProgressReporter
from kiln.common.versions import tool_versions
from kiln.registry import tags as version_tags
from kiln.pipeline.run.context import BuildContext
from kiln.pipeline.run.records import log_figures, size_metrics, variant_records
from kiln.pipeline.plan.cache import StageCache
from kiln.pipeline.plan.dag import SIZE_RECORD, Plan, quantize_request
from kiln.pipeline.run.results import BuildResult, CandidateResult, VariantResult
from kiln.pipeline.run.targets import TargetStages
from kiln.pipeline.plan.stages import PUBLISHED_RECORD, StageInstance
from kiln.pipeline.data.tasks import task_code_lines, task_key, task_requests


class CheckpointStages:
    """quantize -> validate -> publish of each variant's checkpoint, then its SMs and runtimes (TargetStages)."""

    def __init__(self, context: BuildContext):
        self.context = context
        self.plan, self.cache, self.progress, self.loaded = context.plan, context.cache, context.progress, context.loaded
        self.targets = TargetStages(context)
        self._task_requests: list | None = None

    # -- stages --
    def quantize(self, name: str, instance: StageInstance, validate_instance: StageInstance) -> Path:
        context = self.context
        on_loaded = None
        if validate_instance.status.will_run:
            # The baseline's hidden states from this very load, before calibration: one read of the weights for both.
            def compute_baseline(model):
                context.baseline().compute_from(model, context.samples("evaluation"), self.progress)

            on_loaded = compute_baseline

        def build(out: Path) -> None:
            request = quantize_request(self.loaded, self.loaded.recipe.variants[name], instance.target.bits)
            quantize.run(request, context.model_dir(),
                         context.samples("calibration"), out, self.progress, context.placement(), on_loaded)

        return context.get_or_build(instance, build)

    def validate(self, name: str, instance: StageInstance, checkpoint: Path):
        """(metrics, task drops or None) of the exported checkpoint against the baseline."""
        context = self.context

        def build(out: Path) -> None:
            metrics = validate.run(
                checkpoint / quantize.HF_DIR, context.baseline(), context.samples("evaluation"), self.progress, name,
                trust_remote_code=self.loaded.recipe.model.trust_remote_code, placement=context.placement(),
                stream_layers=context.placement().to_disk,
            )
            quantize.release_memory()
            drops = None
            if self.loaded.recipe.evaluation.tasks:
                scores = self._run_tasks(checkpoint / quantize.HF_DIR, baseline=False, label=name)
                drops = validate.compare_tasks(self.task_baseline(), scores)
            validate.write_metrics(metrics, out)
            if drops is not None:
                validate.write_task_drops(drops, out)

        entry = context.get_or_build(instance, build)
        return validate.load_metrics(entry), validate.load_task_drops(entry)

    def checkpoint_to_publish(self, name: str, variant, result: VariantResult) -> tuple[Path, StageInstance]:
        """Quantize and validate the variant's checkpoint; a size search's candidates from the smallest budget up,
        stopping at the first that passes the gates (`result` holds its numbers, and every candidate's).
        Where none passes, the largest is what --publish-failed would publish."""
        candidates = self.plan.candidates(name)
        for q, v in candidates:
            checkpoint = self.quantize(name, q, v)
            record = quantize.CheckpointRecord.load(checkpoint)
            result.trtllm_corrections = record.trtllm_corrections
            result.auto_bits = record.auto["effective_bits"] if record.auto else None
            result.metrics, result.tasks = self.validate(name, v, checkpoint)
            result.gate = variant.gates.evaluate(result.metrics, tasks=result.tasks)
            result.size = self.size(checkpoint)
            if q.target.bits is None:
                break
            result.candidates.append(CandidateResult(q.target.bits, result.size, result.metrics, result.gate))
            if result.gate.passed:
                self.progress.log(f"{q.target}: passed the gates at {result.size.bits_per_weight} bits per weight; "
                                  "it is the one published")
                break
            last = (q, v) == candidates[-1]
            self.progress.log(f"{q.target}: gate failed ({'; '.join(result.gate.failures)})"
                              + ("" if last else "; trying the next budget"))
        return checkpoint, v

    def task_baseline(self) -> dict:
        """The unquantized model's task scores: computed once per model and task list, then cached."""
        key = canonical_digest({"tasks": task_key(self.loaded, self.plan.evaluation.digest),
                                "model": self.plan.model_digest,
                                "trust_remote_code": self.loaded.recipe.model.trust_remote_code,
                                "tools": tool_versions(validate.TOOLS + validate.TASK_TOOLS)})
        entry, _ = self.cache.get_or_build(
            "task-baseline", key, {"model": self.plan.model_digest}, lambda out: validate.write_task_scores(
                self._run_tasks(self.context.model_dir(), baseline=True, label="baseline"), out))
        return validate.load_task_scores(entry)

    def _run_tasks(self, model: Path, baseline: bool, label: str) -> dict:
        evaluation = self.loaded.recipe.evaluation
        if self._task_requests is None:
            self._task_requests = task_requests(self.loaded, self.plan.evaluation.documents)
            if evaluation.allow_code_execution and any(r.unsafe_code for r in self._task_requests):
                self.progress.log(f"running generated code as the recipe allows: {validate.sandbox_description()}")
            for line in task_code_lines(self._task_requests):
                self.progress.log(line)
        try:
            scores = validate.run_tasks(model, self._task_requests, baseline=baseline,
                                        allow_code_execution=evaluation.allow_code_execution, progress=self.progress,
                                        label=label, trust_remote_code=self.loaded.recipe.model.trust_remote_code,
                                        tokenizer=self.context.model_dir())
        except (ValueError, PermissionError) as exc:
            raise UserInputError(f"{self.loaded.path}: evaluation.tasks: {exc}") from None
        except ImportError as exc:   # kiln check says so too; a build from a bare install gets the same line
            raise UserInputError(f"{self.loaded.path}: evaluation.tasks need lm-evaluation-harness ({exc.name} is "
                                 "not installed; fix: pip install 'kiln[eval]')") from None
        quantize.release_memory()
        return scores

    def publish(self, name: str, instance: StageInstance, checkpoint: Path, report: Path, metrics,
                gate: validate.GateResult, candidates: list[CandidateResult] = ()) -> registry.PublishedVersion:
        home = self.plan.home
        aliases = self.loaded.recipe.publish.aliases if gate.passed else ()
        entry = self.cache.lookup("publish", instance.key)
        if entry is not None:
            recorded = json.loads((entry / PUBLISHED_RECORD).read_text())
            found = self._confirmed(recorded, instance.key, aliases, backfill=lambda version: registry.ensure_records(
                home, version, self._records(name, checkpoint, metrics),
                self._tags(name, instance, checkpoint, metrics, gate, candidates)))
            if found is not None and self._check_stored_version(name, found, checkpoint, report):
                return found
            if found is None:
                self.progress.log(f"warning: {recorded['name']}/{recorded['version']} is gone from the registry; "
                                  "publishing again")
            shutil.rmtree(entry, ignore_errors=True)
        tags = self._tags(name, instance, checkpoint, metrics, gate, candidates)
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

    def size(self, checkpoint: Path) -> quantize.CheckpointSize:
        """The checkpoint's bytes and bits per weight, measured once per checkpoint (it reads the source
        model's headers, which a cached rebuild should not need again)."""
        key = checkpoint.name   # the quantize entry's folder is its key

        def build(out: Path) -> None:
            size = quantize.checkpoint_size(checkpoint / quantize.HF_DIR, self.context.model_dir())
            (out / SIZE_RECORD).write_text(json.dumps(size.as_dict(), indent=2) + "\n")

        entry, _ = self.cache.get_or_build("size", key, {"quantize": key}, build)
        return quantize.CheckpointSize(**json.loads((entry / SIZE_RECORD).read_text()))

    def _records(self, name: str, checkpoint: Path, metrics: dict) -> registry.RunRecords:
        record = quantize.CheckpointRecord.load(checkpoint)
        return variant_records(self.loaded, name, record, metrics, self.size(checkpoint),
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

    def _tags(self, name: str, instance: StageInstance, checkpoint: Path, metrics: dict,
              gate: validate.GateResult, candidates: list[CandidateResult] = ()) -> dict[str, str]:
        record = quantize.CheckpointRecord.load(checkpoint)
        model = self.loaded.recipe.model
        return version_tags.checkpoint_tags(
            publish_key=instance.key, recipe=self.loaded.recipe.name, recipe_digest=self.loaded.digest, variant=name,
            source=model.source if model.is_hub else f"local:{self.plan.model_digest[:16]}",
            revision=model.revision or self.plan.model_digest, quant=record.quant, kv_cache=record.kv_cache,
            backend=record.backend,
            algorithm=record.algorithm, export_quant_algo=record.export_quant_algo or "",
            group_size=str(record.group_size or ""),
            metrics={**metrics, **size_metrics(self.size(checkpoint))},
            tools={**record.tools, **tool_versions(())}, passed=gate.passed, failures=gate.failures,
            auto=version_tags.auto_tags(record.auto, record.layer_formats, [c.summary() for c in candidates])
            if record.auto else None, runtimes={
                runtime.value: cell.describe() for runtime, cell in quantize.runtime_cells(
                    record.quant_formats, quantize.KVCacheFormat(record.kv_cache),
                    quantize.Backend(record.backend)).items()})

    def run_variants(self) -> BuildResult:
        plan, cache = self.plan, self.cache
        if any(i.status.will_run for i in plan.instances if i.stage in ("quantize", "validate", "engine-check")):
            self.context.model_dir()  # fetch (and refuse) before any stage starts writing
        for name, variant in plan.loaded.recipe.variants.items():
            if any(q.status.will_run for q, _ in plan.candidates(name)):
                quantize.require_backend(variant.backend)   # a missing tool stops the build before any calibration
        results = []
        for name, variant in plan.loaded.recipe.variants.items():
            result = VariantResult(name, variant.quant_label, variant.kv_cache.value, variant.backend.value)
            checkpoint, v_instance = self.checkpoint_to_publish(name, variant, result)
            if result.gate.passed or self.context.publish_failed:
                report = cache.entry_dir("validate", v_instance.key)
                published_metrics = {**result.metrics.as_dict(), **validate.task_metrics(result.tasks)}
                result.published = self.publish(name, plan.instance("publish", name), checkpoint, report, published_metrics,
                                                  result.gate, result.candidates)
            for sm, c, e, p in plan.sm_instances(name):
                result.engines.append(self.targets.build_sm(name, variant, sm, (c, e, p), checkpoint, result.published))
            for _, check, publish in plan.runtime_check_instances(name):
                result.runtime_checks.append(self.targets.check_runtime(variant, check, publish, checkpoint,
                                                                        result.published))
            results.append(result)
        if log_figures(plan.home, plan.loaded, results):
            self.progress.log("logged the accuracy-against-size figure on the published variants' runs")
        return BuildResult(plan, results, self.context.ran)

def _artifact_files(checkpoint: Path, report: Path) -> dict[str, Path]:
    from kiln.pipeline.plan.cache import ENTRY_FILE

    files = {p.relative_to(checkpoint).as_posix(): p for p in sorted(checkpoint.rglob("*")) if p.is_file()}
    files.pop(ENTRY_FILE, None)
    for published, stored in _REPORT_FILES:
        if (report / stored).is_file():
            files[published] = report / stored
    return files


# What a version holds of its validate entry: the metrics, and the task drops where the recipe names tasks.
_REPORT_FILES = (("validation.json", validate.REPORT), ("tasks.json", validate.TASKS_FILE))


def run_plan(plan: Plan, cache: StageCache, progress: ProgressReporter, publish_failed: bool = False,
             share_names: bool = False) -> BuildResult:
    context = BuildContext(plan, cache, progress, publish_failed, share_names)
    cache.clean_stale_temporaries()
    if not share_names:   # before hours of calibration, not at the end
        for name in plan.loaded.recipe.variants:
            if plan.instance("publish", name).status.will_run:
                registry.check_owner(plan.home, plan.registered_name(name), plan.loaded.recipe.name, name)
    try:
        with cache.hold(i.key for i in plan.instances):   # kiln cache prune leaves what this build reads
            return CheckpointStages(context).run_variants()
    finally:
        context.close()
