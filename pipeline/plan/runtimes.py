"""Stage instances of the runtime checks: each variant the runtimes table says a checked runtime loads gets

    <runtime>-check(variant@<runtime>) -> publish(variant@<runtime>)

run after the variant's checkpoint is published. Where this host lacks the runtime, or it has no kernel
for the format on this hardware, both are planned as skipped, with the reason, as GPU stages are.

RUNTIME_CHECKS has one entry per runtime kiln can run a checkpoint in (vLLM today): adding SGLang's
check is its validate entry point plus a row here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kiln import quantize, validate
from kiln.common.versions import ABSENT, tool_versions
from kiln.pipeline.plan.cache import stage_key
from kiln.pipeline.recipe.schema import Variant
from kiln.pipeline.plan.stages import NOT_PUBLISHED, PUBLISH_VERSION, StageInstance, Status, Target, registry_identity


def cpu_flags() -> set[str]:
    """This CPU's instruction-set flags (/proc/cpuinfo), empty where that is not readable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


@dataclass(frozen=True)
class RuntimeCheck:
    """How a build checks a published checkpoint in one runtime: the runtime as installed here (what its key
    records), why a host without it skips, whether this host's devices have its kernels, the check itself
    (a validate entry point) and its report read back from the cache."""

    runtime: quantize.Runtime
    installed: Callable[[], str]       # "absent", or the build the stage key records ("cpu:0.32.0")
    missing: str                       # the skip reason where it is absent, with its fix
    device_problem: Callable[..., str | None]   # (host, variant, installed) -> why its kernels are missing
    run: Callable[..., object]         # (hf_dir, model_dir, samples, progress, label, max_len, trust) -> report
    load: Callable[[dict], object]     # a report (metrics, greedy_agreement, version, device) from its JSON

    @property
    def stage(self) -> str:
        return f"{self.runtime.value}-check"


def _vllm_device_problem(host, variant: Variant, vllm: str) -> str | None:
    on_cpu = vllm.startswith("cpu:") or not host.gpus
    sms = None if on_cpu else [int(sm[2:]) for sm in host.sms]
    return quantize.vllm_device_problem(variant.quant_formats, variant.kv_cache, variant.backend, cpu_flags=cpu_flags(),
                                        sms=sms)


RUNTIME_CHECKS: dict[quantize.Runtime, RuntimeCheck] = {check.runtime: check for check in (
    RuntimeCheck(quantize.Runtime.vllm, validate.vllm_build,
                 "needs vLLM (set KILN_VLLM_PYTHON to a Python that has it)", _vllm_device_problem,
                 validate.check_vllm, validate.RuntimeReport.from_dict),
)}


def installed_checks() -> dict[quantize.Runtime, str]:
    """Each checked runtime as this host has it (read once per plan: it may ask another interpreter)."""
    return {runtime: check.installed() for runtime, check in RUNTIME_CHECKS.items()}


def skip_reason(check: RuntimeCheck, host, variant: Variant, installed: str) -> Status | None:
    if installed == ABSENT:
        return Status.skip(check.missing)
    problem = check.device_problem(host, variant, installed)
    return Status.skip(problem) if problem else None


def runtime_check_instances(plan, cache, name: str, variant: Variant, checkpoint_key: str,
                            publish_instance: StageInstance, installed: dict) -> list[StageInstance]:
    """Each runtime check and its publish for one variant of `plan` (a Plan, which plans this module's stages):
    none for a runtime the runtimes table says does not load it.

    `installed` is installed_checks(): per runtime, "absent" or the build its key records."""
    instances = []
    loads = quantize.loading_runtimes(variant.quant_formats, variant.kv_cache, variant.backend)
    for runtime, check in RUNTIME_CHECKS.items():
        if runtime in loads:
            instances += _check_instances(plan, cache, name, variant, checkpoint_key, publish_instance, check,
                                          installed[runtime])
    return instances


def _check_instances(plan, cache, name: str, variant: Variant, checkpoint_key: str, publish_instance: StageInstance,
                     check: RuntimeCheck, installed: str) -> list[StageInstance]:
    loaded, runtime = plan.loaded, check.runtime.value
    target = Target(name, runtime=runtime)
    check_key, check_material = stage_key(
        check.stage, validate.STAGE_VERSION,
        {"evaluation": plan.evaluation.key_config(), "max_model_len": loaded.recipe.build.max_seq_len,
         "trust_remote_code": loaded.recipe.model.trust_remote_code},
        {"checkpoint": checkpoint_key, "model": plan.model_digest},
        {runtime: installed, **tool_versions(validate.TOOLS)},
    )
    p_key, p_material = stage_key(
        "publish", PUBLISH_VERSION,
        {"registry": registry_identity(plan.registry_uri), "name": plan.registered_name(name), "runtime": runtime},
        {"version": publish_instance.key, "report": check_key}, tool_versions(()),
    )
    check_instance = StageInstance(check.stage, target, check_key, check_material, depends_on=(checkpoint_key,))
    publish = StageInstance("publish", target, p_key, p_material, depends_on=(check_key, publish_instance.key))
    skip = NOT_PUBLISHED if publish_instance.status.skipped else skip_reason(check, plan.host, variant, installed)
    for instance in (check_instance, publish):
        instance.status = skip or Status.of_cache(cache.intact(instance.stage, instance.key))
    return [check_instance, publish]
