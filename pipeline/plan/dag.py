"""Planning: the DAG of stage instances for a recipe, each with its content key.

fetch(model) -> [score(variant): quant auto] -> quantize(variant) -> validate(variant) -> publish(variant)
                                  -> size(variant) -> publish(variant)
                                  -> compile(variant@sm) -> engine-check(variant@sm) -> publish(variant@sm)
                                  -> vllm-check(variant@vllm) -> publish(variant@vllm)   (plan/runtimes.py)
             -> task-baseline(model) -> validate(variant)   (where the recipe names evaluation.tasks)

GPU stages run only on a host with that SM and TensorRT-LLM, the vLLM check only where vLLM is
installed and has kernels for the format; elsewhere they are planned as skipped, with the reason,
and the rest of the build still publishes.

A stage's input digests are the keys of the stages it reads from (and the
model's content digest), so every key is known before anything runs and
`kiln plan` can say what is cached without importing torch or ModelOpt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kiln import compile as compile_stage
from kiln import quantize, validate
from kiln.pipeline.data.tasks import sandbox_problems, task_key
from kiln.pipeline.plan.cache import StageCache, stage_key
from kiln.pipeline.data.documents import ResolvedData, resolve_data
from kiln.common.digest import canonical_digest
from kiln.common.errors import RecipeErrors
from kiln.common.versions import tool_versions
from kiln.pipeline.data.fetch import FetchedModel, hub_digest, local_model, probe_hub_cache
from kiln.pipeline.recipe.schema import Variant
from kiln.pipeline.recipe.loader import LoadedRecipe
from kiln.pipeline.plan.checks import model_problems
from kiln.pipeline.plan.requests import (
    compile_request, quantize_key_config, quantize_path, quantize_request, quantize_tools, resumable,
)
from kiln.pipeline.plan.runtimes import installed_checks, runtime_check_instances
from kiln.pipeline.plan.score_stage import score_instance, settle_score_status
from kiln.pipeline.plan.stages import (
    MODEL, NOT_PUBLISHED, PUBLISH_VERSION, StageInstance, Status, Target, registry_identity,
)

FETCH_VERSION = 1
SIZE_RECORD = "size.json"          # the "size" stage's cache entries (quantize.checkpoint_size)


@dataclass
class Plan:
    loaded: LoadedRecipe
    home: Path
    registry_uri: str
    model_digest: str
    local_model: FetchedModel | None
    calibration: ResolvedData
    evaluation: ResolvedData
    host: compile_stage.Host = field(default_factory=compile_stage.Host)
    gpu: str | None = None          # --gpu: the one SM this run builds
    instances: list[StageInstance] = field(default_factory=list)
    model_folder: Path | None = None   # where config.json is readable now (a local model, or the HF cache)

    def source_config(self) -> dict | None:
        """The source's config.json (None before it is at hand)."""
        return json.loads((Path(self.model_folder) / "config.json").read_text()) if self.model_folder else None

    def quantize_paths(self) -> dict[str, dict]:
        """Each variant's quantize path (day0 | modelopt) and why."""
        config = self.source_config()
        return {name: dict(zip(("path", "why"), quantize_path(self.loaded, variant, config)))
                for name, variant in self.loaded.recipe.variants.items()}

    def family_summary(self) -> dict | None:
        """The model's family row and what its variants publish (None before config.json is at hand)."""
        if self.model_folder is None:
            return None
        family = quantize.family_of(json.loads((Path(self.model_folder) / "config.json").read_text()))
        if family is None:
            return None
        publishes = ("hf/ (TensorRT-LLM PyTorch backend) and trtllm/ (TensorRT-LLM checkpoint)" if family.trtllm
                     else "hf/ only, for target trtllm-pytorch (no TensorRT-LLM checkpoint: "
                          f"{family.no_trtllm_reason})")
        if self.loaded.recipe.calibration.offload is quantize.Offload.disk and family.trtllm:
            publishes = ("hf/ only (calibration.offload: disk streams the HF export a layer at a time; ModelOpt's "
                         "TensorRT-LLM exporter would assemble the whole state dict): for target trtllm-engine, "
                         "TensorRT-LLM's own converter makes the TensorRT-LLM checkpoint from hf/ on the compile host")
        if any(v.backend is quantize.Backend.llmcompressor for v in self.loaded.recipe.variants.values()):
            publishes += "; backend llmcompressor variants publish hf/ only (compressed-tensors, for vLLM and SGLang)"
        hf_only = sorted({q.value + (f" {v.algorithm}" if v.algorithm in quantize.FORMATS[q].algorithms else "")
                          for v in self.loaded.recipe.variants.values() for q in v.quant_formats
                          if not quantize.FORMATS[q].trtllm.engine_checkpoint
                          or not getattr(quantize.FORMATS[q].algorithms.get(v.algorithm), "engine_checkpoint", True)})
        if family.trtllm and hf_only:
            publishes += (f"; {', '.join(hf_only)} variants publish hf/ only (ModelOpt writes no engine-flow "
                          "checkpoint for them)")
        day0 = sorted(name for name, path in self.quantize_paths().items() if path["path"] == "day0"
                      and quantize.FORMATS[self.loaded.recipe.variants[name].quant].trtllm.engine_checkpoint)
        if family.trtllm and day0:
            publishes += (f"; {', '.join(day0)} publish hf/ only (quantize.path: day0 writes no TensorRT-LLM "
                          "checkpoint: trtllm-engine builds convert hf/ on the compile host)")
        return {"model_type": family.model_type, "title": family.title, "trtllm_checkpoint": bool(family.trtllm),
                "publishes": publishes}

    def notes(self) -> list[str]:
        """What the variants' quantize stages will do that a reader might not expect (a KV cache not calibrated,
        a calibration saved a layer at a time)."""
        notes = [f"{name}: {note}" for name, variant in self.loaded.recipe.variants.items()
                 if (note := quantize.kv_calibration_note(variant.kv_cache))]
        config = self.source_config()
        for name, variant in self.loaded.recipe.variants.items():
            if config is None or not resumable(self.loaded, variant, config):
                continue
            if quantize_request(self.loaded, variant, source_config=config).day0:
                notes.append(f"{name}: the day-0 path records each output shard's digest as it finishes "
                             f"(calibration.resumable: {str(self.loaded.recipe.calibration.resumable).lower()}): a "
                             "killed build keeps the shards it wrote")
            else:
                notes.append(f"{name}: calibration saves each decoder layer as it finishes "
                             f"(calibration.resumable: {str(self.loaded.recipe.calibration.resumable).lower()}): "
                             "a killed build resumes from the last one")
        return notes

    def memory(self):
        """The plan-time memory estimate for this recipe on this host (None before config.json is at hand)."""
        from kiln.pipeline.plan.memory import recipe_estimate

        return recipe_estimate(self.loaded, self.model_folder, self.host)

    def instance(self, stage: str, target: Target | str) -> StageInstance:
        """The instance of `stage` for a target (a variant's name stands for its checkpoint stages)."""
        target = Target(target) if isinstance(target, str) else target
        return next(i for i in self.instances if i.stage == stage and i.target == target)

    def score(self, variant: str) -> StageInstance | None:
        """A quant-auto variant's score stage (plan/score_stage.py); None for any other variant."""
        return next((i for i in self.instances if i.stage == "score" and i.target.variant == variant), None)

    def candidates(self, variant: str) -> list[tuple[StageInstance, StageInstance]]:
        """(quantize, validate) of each checkpoint the variant may publish: one, or a size search's candidates,
        smallest budget first."""
        found = [i for i in self.instances if i.stage == "quantize" and i.target.variant == variant]
        found.sort(key=lambda i: i.target.bits or 0.0)
        return [(q, self.instance("validate", q.target)) for q in found]

    def registered_name(self, variant: str) -> str:
        return f"{self.loaded.recipe.name}-{variant}"

    def runtime_check_instances(self, variant: str) -> list[tuple[str, StageInstance, StageInstance]]:
        """(runtime, check, publish) for each runtime check planned for the variant (plan/runtimes.py)."""
        return [(i.target.runtime, i, self.instance("publish", i.target)) for i in self.instances
                if i.target.runtime and i.stage != "publish" and i.target.variant == variant]

    def sm_instances(self, variant: str) -> list[tuple[str, StageInstance, StageInstance, StageInstance]]:
        """(sm, compile, engine-check, publish) for each SM the variant targets."""
        sms = self.loaded.recipe.variants[variant].sms
        return [(sm, *(self.instance(stage, Target(variant, sm=sm)) for stage in ("compile", "engine-check", "publish")))
                for sm in sms]


def make_plan(loaded: LoadedRecipe, home: Path, cache: StageCache, registry_uri: str,
              gpu: str | None = None, host: compile_stage.Host | None = None) -> Plan:
    recipe = loaded.recipe
    gpu = _selected_sm(loaded, gpu)
    source = recipe.model
    local = None
    if source.is_hub:
        model_digest = hub_digest(source)
    else:
        local = local_model(source, loaded.resolve(source.source))
        model_digest = local.digest
    folder, fetched = (local.path, True) if local else probe_hub_cache(source)
    problems = (model_problems(loaded, folder) if folder else []) + sandbox_problems(loaded)
    if problems:
        raise RecipeErrors(problems)
    plan = Plan(
        loaded=loaded,
        home=home,
        registry_uri=registry_uri,
        model_digest=model_digest,
        local_model=local,
        calibration=resolve_data(recipe.calibration, loaded.resolve, "calibration"),
        evaluation=resolve_data(recipe.evaluation, loaded.resolve, "evaluation"),
        host=host if host is not None else compile_stage.detect_host(),
        gpu=gpu,
        model_folder=folder,
    )

    fetch_key, fetch_material = stage_key("fetch", FETCH_VERSION, {"source": source.model_dump(mode="json")},
                                          {"model": model_digest}, {})
    fetch = StageInstance("fetch", MODEL, fetch_key, fetch_material, Status.of_cache(fetched))
    plan.instances.append(fetch)

    checked_runtimes = installed_checks()
    tasks = task_key(loaded, plan.evaluation.digest)   # None without evaluation.tasks: keys stay as they were
    if tasks:
        plan.instances.append(task_baseline_instance(plan, cache, tasks, fetch_key))
    for name, variant in recipe.variants.items():
        candidates, p, checkpoint_key = checkpoint_instances(plan, cache, name, variant, fetch_key, tasks)
        plan.instances += [i for q, v in candidates for i in (q, v, size_instance(cache, q))] + [p]
        for sm in variant.sms:
            plan.instances += gpu_instances(plan, cache, name, sm, checkpoint_key, p)
        plan.instances += runtime_check_instances(plan, cache, name, variant, checkpoint_key, p, checked_runtimes)
    return plan


Candidate = tuple[StageInstance, StageInstance]   # (quantize, validate) of one checkpoint a variant may publish


def task_baseline_instance(plan: Plan, cache: StageCache, tasks: dict, fetch_key: str) -> StageInstance:
    """The unquantized model's task scores, once per model and task list: every variant's task drops read them."""
    key = canonical_digest({"tasks": tasks, "model": plan.model_digest,
                            "trust_remote_code": plan.loaded.recipe.model.trust_remote_code,
                            "tools": tool_versions(validate.TOOLS + validate.TASK_TOOLS)})
    return StageInstance("task-baseline", MODEL, key, {"model": plan.model_digest},
                         Status.of_cache(cache.intact("task-baseline", key)), depends_on=(fetch_key,))


def size_instance(cache: StageCache, quantize_instance: StageInstance) -> StageInstance:
    """A checkpoint's bytes and bits per weight, measured once (it reads the source's headers); keyed by the
    quantize entry it measures."""
    key, quantized = quantize_instance.key, quantize_instance.status
    status = quantized if quantized.skipped else Status.of_cache(cache.intact("size", key))
    return StageInstance("size", quantize_instance.target, key, {"quantize": key}, status, depends_on=(key,))


def checkpoint_instances(plan: Plan, cache: StageCache, name: str, variant: Variant, fetch_key: str,
                         tasks: dict | None) -> tuple[list[Candidate], StageInstance, str]:
    """quantize -> validate of each checkpoint the variant may publish (one; or a size search's candidates, smallest
    first), then publish; and the key of the checkpoint published, which the GPU and runtime stages build from.

    A search publishes the first candidate that passes the gates: which one follows from the candidates' keys and
    the gates, so the selection's key is their digest, known before anything runs."""
    loaded = plan.loaded
    budgets = variant.auto.candidates if variant.auto is not None and variant.auto.searches else (None,)
    score = score_instance(plan, cache, name, variant, fetch_key)
    candidates = [_candidate_instances(plan, cache, name, variant, fetch_key, tasks, bits, score)
                  for bits in budgets]
    if len(candidates) == 1:
        (q, v), = candidates
        checkpoint_key, inputs = q.key, {"checkpoint": q.key, "report": v.key}
    else:
        checkpoint_key = canonical_digest({"candidates": [[q.key, v.key] for q, v in candidates],
                                           "gates": variant.gates.model_dump(mode="json")})
        inputs = {"selection": checkpoint_key}
    p_key, p_material = stage_key(
        "publish", PUBLISH_VERSION,
        {"registry": registry_identity(plan.registry_uri), "name": plan.registered_name(name),
         "recipe_digest": loaded.digest},
        inputs, tool_versions(()),
    )
    p = StageInstance("publish", Target(name), p_key, p_material, depends_on=tuple(v.key for _, v in candidates))
    p.status = _publish_status(cache, candidates, p, variant)
    if score is not None:
        settle_score_status(score, candidates)
        plan.instances.append(score)
    return candidates, p, checkpoint_key


def _candidate_instances(plan: Plan, cache: StageCache, name: str, variant: Variant, fetch_key: str,
                         tasks: dict | None, bits: float | None, score: StageInstance | None) -> Candidate:
    loaded, source = plan.loaded, plan.loaded.recipe.model
    request = quantize_request(loaded, variant, bits, plan.source_config())
    q_key, q_material = stage_key(
        "quantize", quantize.STAGE_VERSION,
        {"request": quantize_key_config(request),
         # the day-0 path reads no calibration data: other calibration text makes the same checkpoint
         **({} if request.day0 else {"calibration": plan.calibration.key_config()})},
        # a candidate of a size search restores the score stage's search
        {"model": plan.model_digest, **({"score": score.key} if score else {})}, quantize_tools(variant.backend),
    )
    v_key, v_material = stage_key(
        "validate", validate.STAGE_VERSION,
        {"evaluation": plan.evaluation.key_config(), "trust_remote_code": source.trust_remote_code,
         "structure": validate.STRUCTURE_VERSION, "min_expert_tokens": loaded.recipe.calibration.min_expert_tokens,
         **({"tasks": tasks} if tasks else {}),
         **({"allow_differences": list(loaded.recipe.evaluation.allow_differences)}
            if loaded.recipe.evaluation.allow_differences else {})},
        {"checkpoint": q_key, "model": plan.model_digest},
        tool_versions(validate.TOOLS + (validate.TASK_TOOLS if tasks else ())),
    )
    target = Target(name, bits=bits)
    q = StageInstance("quantize", target, q_key, q_material, _quantize_status(cache, q_key),
                      depends_on=(score.key,) if score else (fetch_key,))
    v = StageInstance("validate", target, v_key, v_material, Status.of_cache(cache.intact("validate", v_key)),
                      depends_on=(q_key,))
    return q, v


def _quantize_status(cache: StageCache, key: str) -> Status:
    """Cached, or will run: from a killed calibration's last recorded layer where it left one (digests are
    verified when the build resumes, not here)."""
    status = Status.of_cache(cache.intact("quantize", key))
    resumed = quantize.resume_point(cache.resume_dir("quantize", key)) if status.will_run else None
    return Status(status.state, detail=str(resumed)) if resumed else status


def _selected_sm(loaded: LoadedRecipe, gpu: str | None) -> str | None:
    if gpu is None:
        return None
    try:
        sm = compile_stage.resolve_gpu(gpu).sm
    except ValueError as exc:
        raise RecipeErrors([f"--gpu: {exc}"]) from None
    targeted = sorted({s for v in loaded.recipe.variants.values() for s in v.sms})
    if sm not in targeted:
        listed = ", ".join(targeted) or "none (add `gpus:` to a variant)"
        raise RecipeErrors([f"--gpu {gpu}: no variant of {loaded.path} targets {sm}; its variants target {listed}"])
    return sm


def gpu_instances(plan: Plan, cache: StageCache, name: str, sm: str, checkpoint_key: str,
                  publish_instance: StageInstance) -> list[StageInstance]:
    """compile -> engine-check -> publish for one (variant, SM), each skipped with its reason where it cannot run.

    `checkpoint_key` names the checkpoint compiled: the quantize stage's key, or the registry's
    manifest digest when this host builds from a checkpoint another host published.
    """
    loaded, target = plan.loaded, Target(name, sm=sm)
    request = compile_request(loaded, sm)
    c_key, c_material = stage_key(
        "compile", compile_stage.STAGE_VERSION, {"request": request.key_config()},
        {"checkpoint": checkpoint_key}, compile_stage.tools(plan.host, request.target),
    )
    e_key, e_material = stage_key(
        "engine-check", validate.STAGE_VERSION,
        {"evaluation": plan.evaluation.key_config(), "trust_remote_code": loaded.recipe.model.trust_remote_code},
        {"engine": c_key, "model": plan.model_digest}, tool_versions(validate.TOOLS),
    )
    p_key, p_material = stage_key(
        "publish", PUBLISH_VERSION,
        {"registry": registry_identity(plan.registry_uri), "name": plan.registered_name(name), "sm": sm},
        {"version": publish_instance.key, "engine": c_key, "report": e_key}, tool_versions(()),
    )
    c = StageInstance("compile", target, c_key, c_material, depends_on=(checkpoint_key,))
    e = StageInstance("engine-check", target, e_key, e_material, depends_on=(c_key,))
    p = StageInstance("publish", target, p_key, p_material, depends_on=(e_key, publish_instance.key))
    skip = _gpu_skip_reason(plan, sm, request, publish_instance)
    for instance in (c, e, p):
        instance.status = skip or Status.of_cache(cache.intact(instance.stage, instance.key))
    if e.status.cached:
        gate = loaded.recipe.variants[name].gates.evaluate(validate.load_metrics(cache.entry_dir("engine-check", e_key)))
        if not gate.passed:
            p.status = Status.skip(f"engine gate failed ({'; '.join(gate.failures)})")
    return [c, e, p]


def _gpu_skip_reason(plan: Plan, sm: str, request, publish_instance: StageInstance) -> Status | None:
    if plan.gpu is not None and sm != plan.gpu:
        return Status.skip(f"not selected (--gpu {plan.gpu})")
    if publish_instance.status.skipped:
        return NOT_PUBLISHED
    problem = plan.host.compile_problem(sm, request.target, request.tp_size)
    return Status.skip(problem) if problem else None


def _publish_status(cache: StageCache, candidates: list[Candidate], publish_instance: StageInstance,
                    variant: Variant) -> Status:
    """Publish is skipped when every candidate's cached report fails the gates; a search's candidates above
    the first cached pass are skipped too (they need not run)."""
    failures = []
    for index, (q, v) in enumerate(candidates):
        if not v.status.cached:
            return Status.of_cache(cache.intact("publish", publish_instance.key))
        entry = cache.entry_dir("validate", v.key)
        gate = variant.gates.evaluate(validate.load_metrics(entry), tasks=validate.load_task_drops(entry),
                                      structure=validate.load_structure(entry))
        if gate.passed:
            passed = Status.skip(f"{q.target} passed the gates")
            for later in candidates[index + 1:]:
                for instance in later:
                    instance.status = instance.status if instance.status.cached else passed
            return Status.of_cache(cache.intact("publish", publish_instance.key))
        failures.append(("" if len(candidates) == 1 else f"{q.target}: ") + "; ".join(gate.failures))
    return Status.skip(f"gate failed ({' | '.join(failures)})")
