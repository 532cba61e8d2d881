"""Planning: the DAG of stage instances for a recipe, each with its content key.

fetch(model) -> quantize(variant) -> validate(variant) -> publish(variant)

A stage's input digests are the keys of the stages it reads from (and the
model's content digest), so every key is known before anything runs and
`kiln plan` can say what is cached without importing torch or ModelOpt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from kiln import quantize, validate
from kiln.pipeline.cache import StageCache, stage_key
from kiln.pipeline.data import ResolvedData, resolve_data
from kiln.pipeline.errors import RecipeErrors
from kiln.pipeline.fetch import FetchedModel, hub_digest, local_model
from kiln.pipeline.recipe import Variant
from kiln.pipeline.recipe_loader import LoadedRecipe

FETCH_VERSION = 1
PUBLISH_VERSION = 1
PUBLISHED_RECORD = "published.json"


def tool_versions(names) -> dict[str, str]:
    found = {}
    for name in (*names, "kiln"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


@dataclass
class StageInstance:
    stage: str
    target: str
    key: str
    material: dict
    status: str = "will run"
    depends_on: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {"stage": self.stage, "target": self.target, "key": self.key, "status": self.status,
                "depends_on": list(self.depends_on)}


@dataclass
class Plan:
    loaded: LoadedRecipe
    home: Path
    registry_uri: str
    model_digest: str
    local_model: FetchedModel | None
    calibration: ResolvedData
    evaluation: ResolvedData
    instances: list[StageInstance] = field(default_factory=list)

    def instance(self, stage: str, target: str) -> StageInstance:
        return next(i for i in self.instances if i.stage == stage and i.target == target)

    def registered_name(self, variant: str) -> str:
        return f"{self.loaded.recipe.name}-{variant}"


def quantize_request(loaded: LoadedRecipe, variant: Variant) -> quantize.QuantizeRequest:
    model = loaded.recipe.model
    return quantize.QuantizeRequest(
        quant=variant.quant,
        kv_cache=variant.kv_cache,
        group_size=variant.effective_group_size,
        dtype=model.dtype,
        tp_size=loaded.recipe.build.tp_size,
        trust_remote_code=model.trust_remote_code,
        allow_pickle=model.allow_pickle,
        alpha=variant.alpha,
        exclude=variant.exclude,
    )


def width_problems(loaded: LoadedRecipe, model_dir: Path) -> list[str]:
    """Variants whose block size does not divide some layer's input width, naming the layers."""
    problems = []
    for name, variant in loaded.recipe.variants.items():
        layers = quantize.layer_width_problems(model_dir, variant.quant, variant.effective_group_size, variant.exclude)
        if layers:
            problems.append(
                f"{loaded.path}: variants.{name}: {variant.quant.value} with group size {variant.effective_group_size} "
                f"cannot pack {', '.join(layers)} (fix: choose a group size that divides these widths, or another format)"
            )
    return problems


def make_plan(loaded: LoadedRecipe, home: Path, cache: StageCache, registry_uri: str) -> Plan:
    recipe = loaded.recipe
    source = recipe.model
    local = None
    if source.is_hub:
        model_digest = hub_digest(source)
    else:
        local = local_model(source, loaded.resolve(source.source))
        model_digest = local.digest
    folder, fetched = (local.path, True) if local else _probe_hub_cache(source)
    problems = width_problems(loaded, folder) if folder else []
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
    )

    fetch_key, fetch_material = stage_key("fetch", FETCH_VERSION, {"source": source.model_dump(mode="json")},
                                          {"model": model_digest}, {})
    fetch = StageInstance("fetch", "model", fetch_key, fetch_material, "cached" if fetched else "will run")
    plan.instances.append(fetch)

    for name, variant in recipe.variants.items():
        request = quantize_request(loaded, variant)
        q_key, q_material = stage_key(
            "quantize", quantize.STAGE_VERSION,
            {"request": _jsonable(request), "calibration": plan.calibration.key_config()},
            {"model": model_digest}, tool_versions(quantize.TOOLS),
        )
        v_key, v_material = stage_key(
            "validate", validate.STAGE_VERSION,
            {"evaluation": plan.evaluation.key_config(), "trust_remote_code": source.trust_remote_code},
            {"checkpoint": q_key, "model": model_digest}, tool_versions(validate.TOOLS),
        )
        p_key, p_material = stage_key(
            "publish", PUBLISH_VERSION,
            {"registry": registry_uri, "name": plan.registered_name(name), "recipe_digest": loaded.digest},
            {"checkpoint": q_key, "report": v_key}, tool_versions(()),
        )
        q = StageInstance("quantize", name, q_key, q_material, depends_on=(fetch_key,))
        v = StageInstance("validate", name, v_key, v_material, depends_on=(q_key,))
        p = StageInstance("publish", name, p_key, p_material, depends_on=(v_key,))
        q.status = "cached" if cache.peek("quantize", q_key) else "will run"
        v.status = "cached" if cache.peek("validate", v_key) else "will run"
        p.status = _publish_status(cache, v, p, variant)
        plan.instances += [q, v, p]
    return plan


def _publish_status(cache: StageCache, validate_instance: StageInstance, publish_instance: StageInstance, variant: Variant) -> str:
    if validate_instance.status == "cached":
        metrics = validate.load_metrics(cache.entry_dir("validate", validate_instance.key))
        gate = validate.evaluate_gates(metrics, **variant.gates.model_dump())
        if not gate.passed:
            return f"skipped: gate failed ({'; '.join(gate.failures)})"
    return "cached" if cache.peek("publish", publish_instance.key) else "will run"


def _probe_hub_cache(source) -> tuple[Path | None, bool]:
    """(folder for plan-time checks, whether the pinned snapshot is fully in the HF cache).

    The folder is the cached snapshot, or the one holding a cached config.json alone,
    or None; the network is never asked. Refusals (pickle-only weights) propagate.
    """
    from kiln.pipeline.errors import KilnError, UserInputError
    from kiln.pipeline.fetch import cached_hub_config, hub_model

    try:
        return hub_model(source, local_only=True).path, True
    except UserInputError:
        raise
    except KilnError:
        config = cached_hub_config(source)  # config.json alone is enough for the width check
        return (config.parent if config else None), False


def checkable_model_folder(loaded: LoadedRecipe) -> Path | None:
    """A local folder with the model's config.json (and weights, if present) for plan-time checks.

    Local sources always have one; hub sources only when the HF cache does. Otherwise
    the runner checks right after fetching, before any stage runs.
    """
    source = loaded.recipe.model
    if not source.is_hub:
        return local_model(source, loaded.resolve(source.source)).path
    return _probe_hub_cache(source)[0]


def _jsonable(request: quantize.QuantizeRequest) -> dict:
    def encode(value):
        return list(value) if isinstance(value, tuple) else value.value

    return json.loads(json.dumps(request.__dict__, default=encode))
