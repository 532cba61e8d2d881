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

import contextlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from kiln import quantize, registry, validate
from kiln.common.progress import ProgressReporter
from kiln.pipeline.plan.cache import StageCache
from kiln.pipeline.plan.dag import Plan
from kiln.pipeline.plan.requests import quantize_request, resumable
from kiln.pipeline.plan.stages import StageInstance
from kiln.pipeline.run.context import BuildContext
from kiln.pipeline.run.publishing import PublishStage
from kiln.pipeline.run.records import log_figures
from kiln.pipeline.run.results import BuildResult, CandidateResult, VariantResult
from kiln.pipeline.run.targets import TargetStages
from kiln.pipeline.run.validation import MeasureStages


@dataclass(frozen=True)
class QuantizeOnly:
    """One variant's quantize stage under `kiln build --stage quantize`. status: ran | cached | node (a node
    other than 0 calibrated its share; node 0 writes the entry)."""

    variant: str
    key: str
    status: str
    seconds: float | None
    entry: Path | None


class CheckpointStages:
    """quantize -> validate (and size, task-baseline: MeasureStages) -> publish (PublishStage) of each variant's
    checkpoint, then its SMs and runtimes (TargetStages)."""

    def __init__(self, context: BuildContext):
        self.context = context
        self.plan, self.cache, self.progress, self.loaded = context.plan, context.cache, context.progress, context.loaded
        self.measures = MeasureStages(context)
        self.publishing = PublishStage(context, self.measures.size)
        self.targets = TargetStages(context)

    def quantize(self, name: str, instance: StageInstance, validate_instance: StageInstance,
                 baseline: bool = True) -> Path | None:
        """The checkpoint's cache entry; None on a node other than 0 of a calibration across nodes, which
        calibrates its share and writes nothing (node 0 writes the entry to the KILN_HOME they share)."""
        context = self.context
        variant = self.loaded.recipe.variants[name]
        request = quantize_request(self.loaded, variant, instance.target.bits, self.plan.source_config())
        on_loaded = None
        if baseline and validate_instance.status.will_run and not request.day0:
            # The baseline's hidden states from this very load, before calibration: one read of the weights for both.
            def compute_baseline(model):
                context.baseline().compute_from(model, context.samples("evaluation"), self.progress)
                quantize.release_memory()   # the forwards' freed activations, before calibration and export

            on_loaded = compute_baseline

        resume_dir = self.cache.resume_dir(instance.stage, instance.key)
        score = self.plan.score(name)

        def build(out: Path) -> None:
            # a size search's candidate restores the scores (run first, and once, where no candidate ran before)
            search_state = self.score(name, score) / quantize.SEARCH_STATE if score is not None else None
            model_dir = context.model_dir()
            source_config = json.loads((model_dir / "config.json").read_text())
            # the day-0 path reads no calibration data: it is not tokenized for it
            calibration = None if request.day0 else context.samples("calibration")
            quantize.run(request, model_dir, calibration, out, self.progress, context.placement(), on_loaded,
                         resume_dir if resumable(self.loaded, variant, source_config) else None,
                         workers=self.loaded.recipe.quantize.workers, search_state=search_state)

        if not quantize.writes_here(request):
            if self.cache.lookup(instance.stage, instance.key) is None:   # node 0 finds it cached too, and skips
                with tempfile.TemporaryDirectory(prefix="kiln-node-") as out:
                    build(Path(out))
                context.record_ran(instance)
            return None
        entry = context.get_or_build(instance, build)
        shutil.rmtree(resume_dir, ignore_errors=True)   # the entry is written: its calibration is never resumed
        return entry

    def quantize_only(self) -> list[QuantizeOnly]:
        """`kiln build --stage quantize`: each variant's checkpoint (a size search's first budget) into the cache,
        and nothing after it: what every node of a calibration across nodes runs before node 0 builds the rest."""
        done = []
        for name in self.loaded.recipe.variants:
            q, v = self.plan.candidates(name)[0]
            cached = not q.status.will_run
            entry = self.quantize(name, q, v, baseline=False)
            done.append(QuantizeOnly(name, q.key, "cached" if cached else "ran" if entry else "node",
                                     q.seconds, entry))
        return done

    def score(self, name: str, instance: StageInstance) -> Path:
        """A size search's scores (plan/score_stage.py): computed before its first candidate that runs, then read
        by every other; `kiln build` prints the frontier they predict."""
        context = self.context
        variant = self.loaded.recipe.variants[name]
        request = quantize_request(self.loaded, variant, None, self.plan.source_config())

        def build(out: Path) -> None:
            quantize.score(request, context.model_dir(), context.samples("calibration"), out, self.progress,
                           context.placement(), variant.auto.candidates)

        return context.get_or_build(instance, build)

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
            result.metrics, result.tasks, result.structure = self.measures.validate(name, v, checkpoint)
            result.gate = variant.gates.evaluate(result.metrics, tasks=result.tasks, structure=result.structure)
            result.size = self.measures.size(checkpoint)
            if q.target.bits is None:
                break
            result.candidates.append(CandidateResult(q.target.bits, result.size, result.metrics, result.gate,
                                                     record.auto.get("score")))
            if result.gate.passed:
                self.progress.log(f"{q.target}: passed the gates at {result.size.bits_per_weight} bits per weight; "
                                  "it is the one published")
                break
            last = (q, v) == candidates[-1]
            self.progress.log(f"{q.target}: gate failed ({'; '.join(result.gate.failures)})"
                              + ("" if last else "; trying the next budget"))
        score = self.plan.score(name)
        if score is not None and self.cache.intact("score", score.key):
            result.frontier = quantize.read_score(self.cache.entry_dir("score", score.key))["frontier"]
        return checkpoint, v

    def before_any_stage(self, stages: tuple[str, ...]) -> None:
        """Fetch (and refuse) the model before any of `stages` starts writing; a missing quantize tool stops the
        build before any calibration."""
        plan = self.plan
        if any(i.status.will_run for i in plan.instances if i.stage in stages):
            self.context.model_dir()
        for name, variant in plan.loaded.recipe.variants.items():
            if any(q.status.will_run for q, _ in plan.candidates(name)):
                quantize.require_backend(variant.backend)

    def run_variants(self) -> BuildResult:
        plan, cache = self.plan, self.cache
        self.before_any_stage(("quantize", "validate", "engine-check"))
        results = []
        for name, variant in plan.loaded.recipe.variants.items():
            result = VariantResult(name, variant.quant_label, variant.kv_cache.value, variant.backend.value)
            checkpoint, v_instance = self.checkpoint_to_publish(name, variant, result)
            if result.gate.passed or self.context.publish_failed:
                report = cache.entry_dir("validate", v_instance.key)
                published_metrics = {**result.metrics.as_dict(), **validate.task_metrics(result.tasks)}
                result.published = self.publishing.publish(name, plan.instance("publish", name), checkpoint, report,
                                                           published_metrics, result.gate, result.candidates)
            for sm, c, e, p in plan.sm_instances(name):
                result.engines.append(self.targets.build_sm(name, variant, sm, (c, e, p), checkpoint, result.published))
            for _, check, publish in plan.runtime_check_instances(name):
                result.runtime_checks.append(self.targets.check_runtime(variant, check, publish, checkpoint,
                                                                        result.published))
            results.append(result)
        if log_figures(plan.home, plan.loaded, results):
            self.progress.log("logged the accuracy-against-size figure on the published variants' runs")
        return BuildResult(plan, results, self.context.ran)


def run_plan(plan: Plan, cache: StageCache, progress: ProgressReporter, publish_failed: bool = False,
             share_names: bool = False) -> BuildResult:
    if not share_names:   # before hours of calibration, not at the end
        for name in plan.loaded.recipe.variants:
            if plan.instance("publish", name).status.will_run:
                registry.check_owner(plan.home, plan.registered_name(name), plan.loaded.recipe.name, name)
    with _stages(plan, cache, progress, publish_failed, share_names) as stages:
        return stages.run_variants()


def run_quantize_stage(plan: Plan, cache: StageCache, progress: ProgressReporter) -> list[QuantizeOnly]:
    """`kiln build --stage quantize`: each variant's quantize stage into the cache, no validation or publishing."""
    with _stages(plan, cache, progress) as stages:
        stages.before_any_stage(("quantize",))
        return stages.quantize_only()


@contextlib.contextmanager
def _stages(plan: Plan, cache: StageCache, progress: ProgressReporter, publish_failed: bool = False,
            share_names: bool = False) -> Iterator[CheckpointStages]:
    """A build's stages, with the partial entries of dead builds cleared and the plan's entries held."""
    context = BuildContext(plan, cache, progress, publish_failed, share_names)
    cache.clean_stale_temporaries()
    try:
        with cache.hold(i.key for i in plan.instances):   # kiln cache prune leaves what this build reads
            yield CheckpointStages(context)
    finally:
        context.close()
