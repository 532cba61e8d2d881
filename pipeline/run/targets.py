"""The runner's stages past the checkpoint: per SM (compile -> engine check -> publish into the variant's
version) and per runtime (vllm-check -> gate -> its result on the version), over an explicit build context.
"""

from __future__ import annotations

import json
from pathlib import Path

from kiln import compile as compile_stage
from kiln import quantize, registry, validate
from kiln.registry import tags as version_tags
from kiln.pipeline.run.context import BuildContext
from kiln.pipeline.plan.dag import compile_request, gpu_instances
from kiln.pipeline.plan.runtimes import RUNTIME_CHECKS
from kiln.pipeline.run.results import TargetResult
from kiln.pipeline.plan.stages import NOT_PUBLISHED, PUBLISHED_RECORD, StageInstance


class TargetStages:
    def __init__(self, context: BuildContext):
        self.context = context
        self.plan, self.cache, self.progress, self.loaded = context.plan, context.cache, context.progress, context.loaded

    def compile(self, sm: str, instance: StageInstance, checkpoint: Path) -> Path:
        def build(out: Path) -> None:
            compile_stage.run(compile_request(self.loaded, sm), checkpoint, out, self.plan.host, self.progress)

        return self.context.get_or_build(instance, build) / compile_stage.sm_folder(sm)

    def engine_check(self, instance: StageInstance, sm_dir: Path, checkpoint: Path) -> validate.Metrics:
        def build(out: Path) -> None:
            recipe = self.loaded.recipe
            validate.write_metrics(validate.check_engine(
                recipe.build.target, sm_dir, checkpoint / quantize.HF_DIR, self.context.model_dir(),
                self.context.samples("evaluation"), self.progress, str(instance.target), tp_size=recipe.build.tp_size,
                trust_remote_code=recipe.model.trust_remote_code), out)

        return validate.load_metrics(self.context.get_or_build(instance, build))

    def publish_sm(self, sm: str, instance: StageInstance, version: registry.PublishedVersion, sm_dir: Path,
                   report: Path, metrics: validate.Metrics, gate: validate.GateResult) -> None:
        if self.cache.lookup("publish", instance.key) is not None and sm in registry.held_sms_of(self.plan.home, version):
            return
        folder = compile_stage.sm_folder(sm)
        files = {f"{folder}/{p.relative_to(sm_dir).as_posix()}": p for p in sorted(sm_dir.rglob("*")) if p.is_file()}
        files[f"{folder}/{compile_stage.CHECK_REPORT}"] = report / validate.REPORT
        record = compile_stage.load_record(sm_dir)
        engine_metrics = {**metrics.as_dict(), "build_seconds": record["build_seconds"]}
        tags = version_tags.engine_tags(sm, target=record["target"], tensorrt=record["tensorrt"] or "",
                                        tensorrt_llm=record["tensorrt_llm"], gpu=record["gpu"],
                                        metrics=engine_metrics, passed=gate.passed, failures=gate.failures)
        added = registry.add_sm(self.plan.home, version, sm, files, tags, instance.key, record, self.progress,
                                records=registry.prefixed_metrics(sm, engine_metrics))
        if added is None:
            self.progress.log(f"{version.name}/{version.version} already holds these {sm} engines")
        with self.cache.write("publish", instance.key, instance.material) as out:
            (out / PUBLISHED_RECORD).write_text(json.dumps({**version.as_dict(), "sm": sm}, indent=2) + "\n")
        self.context.record_ran(instance)

    def check_runtime(self, variant, check: StageInstance, publish: StageInstance, checkpoint: Path,
                      version) -> TargetResult:
        """<runtime>-check -> gate -> its result on the variant's version (kiln.check.<runtime>.*)."""
        runtime = check.target.runtime
        if check.status.skipped:
            return TargetResult(check.target, str(check.status))
        if version is None:
            return TargetResult(check.target, str(NOT_PUBLISHED))
        status = "cached" if check.status.cached else "checked"
        how = RUNTIME_CHECKS[quantize.Runtime(runtime)]

        def build(out: Path) -> None:
            recipe = self.loaded.recipe
            report = how.run(checkpoint / quantize.HF_DIR, self.context.model_dir(),
                             self.context.samples("evaluation"), self.progress, str(check.target),
                             recipe.build.max_seq_len, recipe.model.trust_remote_code)
            (out / validate.REPORT).write_text(json.dumps(report.as_dict(), indent=2, sort_keys=True) + "\n")

        entry = self.context.get_or_build(check, build)
        report = how.load(json.loads((entry / validate.REPORT).read_text()))
        gate = variant.gates.evaluate(report.metrics)
        result = TargetResult(check.target, status, report.metrics, gate, report=report)
        if gate.passed or self.context.publish_failed:
            tags = version_tags.runtime_check_tags(runtime, version=report.version, device=report.device,
                                                   metrics=report.metrics.as_dict(),
                                                   greedy_agreement=report.greedy_agreement,
                                                   passed=gate.passed, failures=gate.failures)
            measured = {**report.metrics.as_dict(), "greedy_agreement": report.greedy_agreement}
            added = registry.add_runtime_check(self.plan.home, version, runtime, tags, publish.key,
                                               records=registry.prefixed_metrics(runtime, measured))
            if self.cache.lookup("publish", publish.key) is None:
                with self.cache.write("publish", publish.key, publish.material) as out:
                    (out / PUBLISHED_RECORD).write_text(json.dumps({**version.as_dict(), "runtime": runtime}) + "\n")
            if added:
                self.context.record_ran(publish)
            result.published = True
        return result

    def registry_checkpoint(self, version: registry.PublishedVersion) -> tuple[Path, str]:
        """The checkpoint a version holds, pulled (verified) into the cache: (folder, its manifest digest)."""
        digest = registry.checkpoint_digest(self.plan.home, version)
        entry, _ = self.cache.get_or_build("registry-checkpoint", digest, {"version": version.as_dict()},
                                           lambda out: registry.pull(self.plan.home, f"{version.name}/{version.version}",
                                                                     out, self.progress, sm=None))
        return entry, digest

    def build_sm(self, name: str, variant, sm: str, instances, checkpoint: Path, version) -> TargetResult:
        """compile -> engine check -> gate -> publish into the variant's version, for one SM.

        The registry's checkpoint wins: if another host published this variant from other bytes
        (quantization is not bit-reproducible across machines), this SM is rebuilt from those.
        """
        compile_instance, check_instance, _ = instances
        if compile_instance.status.skipped:
            return TargetResult(compile_instance.target, str(compile_instance.status))
        if version is None:
            return TargetResult(compile_instance.target, str(NOT_PUBLISHED))
        status = "cached" if compile_instance.status.cached and check_instance.status.cached else "built"
        try:
            return self._compile_check_publish(variant, sm, instances, checkpoint, version, status)
        except registry.CheckpointMismatch as exc:
            self.progress.log(f"note: {exc}; building {sm} from the checkpoint in the registry instead")
        published, digest = self.registry_checkpoint(version)
        instances = gpu_instances(self.plan, self.cache, name, sm, digest, self.plan.instance("publish", name))
        return self._compile_check_publish(variant, sm, instances, published, version, "built from the registry's checkpoint")

    def _compile_check_publish(self, variant, sm: str, instances, checkpoint: Path, version, status: str) -> TargetResult:
        compile_instance, check_instance, publish_instance = instances
        sm_dir = self.compile(sm, compile_instance, checkpoint)
        metrics = self.engine_check(check_instance, sm_dir, checkpoint)
        gate = variant.gates.evaluate(metrics)
        result = TargetResult(compile_instance.target, status, metrics, gate)
        if gate.passed or self.context.publish_failed:
            report = self.cache.entry_dir("engine-check", check_instance.key)
            self.publish_sm(sm, publish_instance, version, sm_dir, report, metrics, gate)
            result.published = True
        return result
