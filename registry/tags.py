"""Every tag kiln writes on a registry version, and the functions that write and read them.

The publish side (the pipeline's runner, add_sm) and the readers (promote, diff, ls, pull) meet
here only: a renamed tag changes both sides at once. Checkpoint tags are `kiln.<field>`; an SM's
are `kiln.sm.<sm>.<field>`; promotions are `kiln.promotion.<alias>.<field>`.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Mapping

from kiln.common.digest import canonical_digest

PUBLISH_KEY = "kiln.publish_key"          # the publish stage's cache key: a republish finds its version
MANIFEST = "kiln.manifest_sha256"         # digest of the version's manifest.json
STORAGE = "kiln.storage"                  # how the files are stored (kiln.registry.blobs)
RECIPE = "kiln.recipe"                    # with VARIANT: who owns the registered model's name
VARIANT = "kiln.variant"
RECIPE_DIGEST = "kiln.recipe_digest"
SOURCE = "kiln.source"
REVISION = "kiln.revision"
QUANT = "kiln.quant"
BACKEND = "kiln.backend"                  # what made the checkpoint: modelopt | llmcompressor
KV_CACHE = "kiln.kv_cache"
ALGORITHM = "kiln.algorithm"
EXPORT_QUANT_ALGO = "kiln.export_quant_algo"
GROUP_SIZE = "kiln.group_size"
GATE = "kiln.gate"                        # pass | fail; GATE + ".failures" names each failed gate
METRIC = "kiln.metric."                   # + metric name
TOOL = "kiln.tool."                       # + package name
SM = "kiln.sm."                           # + <sm>.<field>
RUNTIME = "kiln.runtime."                 # + runtime name: "yes|no|unchecked (version, evidence)"
CHECK = "kiln.check."                     # + <runtime>.<field>: the checkpoint measured in that runtime (vllm)
PROMOTION = "kiln.promotion"              # + .<alias>.<field>
REGISTERED_MODEL = "kiln.registered_model"   # on the version's run
RUN_RECORDS = "kiln.run_records"          # the run holds kiln's MLflow metrics and params (registry.run_records)
RUN_RECORDS_VERSION = "1"
FIGURE = "kiln.figure"                    # digest of the data behind the accuracy-against-size figure on the run
AUTO = "kiln.auto."                       # + field: quant auto's budget, measured size and chosen layer formats
SEARCH_CANDIDATES = "candidates"          # AUTO + this: a size search's candidates, as JSON
STRUCTURE = "kiln.structure"              # the structure checks: "passed; checked scales 84, ..." | "failed: ..."
EXPERTS = "kiln.experts"                  # MoE: the calibration tokens table summed up (kiln.json holds the table)
AUTO_BITS = AUTO + "effective_bits"       # quant auto's budget: tables show "auto 5.5b"

# An SM's own fields (sm_tag): what built it, its gate and metrics, its publish key and manifest.
SM_TARGET, SM_TENSORRT, SM_TENSORRT_LLM, SM_GPU = "target", "tensorrt", "tensorrt_llm", "gpu"
SM_GATE, SM_METRIC, SM_PUBLISH_KEY, SM_MANIFEST = "gate", "metric.", "publish_key", "manifest_sha256"
_FAILURES = ".failures"


def sm_tag(sm: str, field: str) -> str:
    return f"{SM}{sm}.{field}"


def held_sms(tags: Mapping[str, str]) -> list[str]:
    """The SMs whose engines are completely in the version (their manifest tag is set last)."""
    suffix = f".{SM_MANIFEST}"
    return sorted(key[len(SM):-len(suffix)] for key in tags if key.startswith(SM) and key.endswith(suffix))


def gate_tags(passed: bool, failures, sm: str | None = None, key: str | None = None) -> dict[str, str]:
    """pass|fail, and which gates failed: the checkpoint's (sm None), an SM's, or the one at `key`."""
    key = key or (GATE if sm is None else sm_tag(sm, SM_GATE))
    tags = {key: "pass" if passed else "fail"}
    if not passed:
        tags[key + _FAILURES] = "; ".join(failures)
    return tags


def metric_tags(metrics: Mapping[str, object], sm: str | None = None) -> dict[str, str]:
    prefix = METRIC if sm is None else sm_tag(sm, SM_METRIC)
    return {f"{prefix}{name}": repr(value) for name, value in metrics.items()}


def tool_tags(versions: Mapping[str, str]) -> dict[str, str]:
    return {f"{TOOL}{name}": version for name, version in versions.items()}


CHECK_VERSION, CHECK_DEVICE, CHECK_GATE, CHECK_METRIC, CHECK_GREEDY, CHECK_KEY = (
    "version", "device", "gate", "metric.", "greedy_agreement", "publish_key")


def check_tag(runtime: str, field: str) -> str:
    return f"{CHECK}{runtime}.{field}"


def checked_runtimes(tags: Mapping[str, str]) -> list[str]:
    """The runtimes whose check result is on the version (the publish key is set last)."""
    suffix = f".{CHECK_KEY}"
    return sorted(key[len(CHECK):-len(suffix)] for key in tags if key.startswith(CHECK) and key.endswith(suffix))


def runtime_check_tags(runtime: str, *, version: str, device: str, metrics: Mapping[str, object],
                       greedy_agreement: float, passed: bool, failures) -> dict[str, str]:
    """What a runtime check (vllm-check) adds to a version: the runtime's version and device, the metrics
    measured in it, how often its greedy tokens equal the reference runtime's, and its gate."""
    return {check_tag(runtime, CHECK_VERSION): version, check_tag(runtime, CHECK_DEVICE): device,
            check_tag(runtime, CHECK_GREEDY): repr(greedy_agreement),
            **{check_tag(runtime, CHECK_METRIC + name): repr(value) for name, value in metrics.items()},
            **gate_tags(passed, failures, key=check_tag(runtime, CHECK_GATE))}


def runtime_tags(cells: Mapping[str, str]) -> dict[str, str]:
    return {f"{RUNTIME}{runtime}": cell for runtime, cell in cells.items()}


def runtimes_of(tags: Mapping[str, str]) -> dict[str, str]:
    """Per runtime, the runtimes-table cell the version was published with."""
    return _prefixed(tags, RUNTIME)


def loading_runtimes_of(tags: Mapping[str, str]) -> list[str]:
    """The runtimes whose cell says the version loads ("yes ...")."""
    return [runtime for runtime, cell in runtimes_of(tags).items() if cell.split(" ", 1)[0] == "yes"]


def _prefixed(tags: Mapping[str, str], prefix: str) -> dict[str, str]:
    return {key[len(prefix):]: value for key, value in tags.items() if key.startswith(prefix)}


def metrics_of(tags: Mapping[str, str], sm: str | None = None) -> dict[str, float]:
    """The checkpoint's metrics (sm None) or an SM's engine-check metrics, as numbers (unreadable ones left out)."""
    return _numbers(_prefixed(tags, METRIC if sm is None else sm_tag(sm, SM_METRIC)))


def check_metrics_of(tags: Mapping[str, str], runtime: str) -> dict[str, float]:
    """What a runtime check measured in `runtime` (its metrics and greedy agreement), as numbers."""
    return _numbers({**_prefixed(tags, check_tag(runtime, CHECK_METRIC)),
                     CHECK_GREEDY: tags.get(check_tag(runtime, CHECK_GREEDY), "")})


def _numbers(values: Mapping[str, str]) -> dict[str, float]:
    found = {}
    for name, value in values.items():
        try:
            found[name] = float(value)
        except ValueError:
            continue
    return found


def tools_of(tags: Mapping[str, str]) -> dict[str, str]:
    """Tool versions: the checkpoint's (package -> version) and each held SM's TensorRT pair (<sm>.<tool>)."""
    engines = {f"{sm}.{tool}": tags.get(sm_tag(sm, tool)) for sm in held_sms(tags)
               for tool in (SM_TENSORRT, SM_TENSORRT_LLM)}
    return {**_prefixed(tags, TOOL), **engines}


def _gate_keys(tags: Mapping[str, str]) -> list[tuple[str, str]]:
    """(what, gate tag): the checkpoint's, each held SM's, each checked runtime's."""
    return ([("checkpoint", GATE)] + [(sm, sm_tag(sm, SM_GATE)) for sm in held_sms(tags)]
            + [(runtime, check_tag(runtime, CHECK_GATE)) for runtime in checked_runtimes(tags)])


def gates_of(tags: Mapping[str, str]) -> dict[str, str | None]:
    """pass|fail for the checkpoint, each held SM and each checked runtime."""
    return {what: tags.get(key) for what, key in _gate_keys(tags)}


def gate_failures(tags: Mapping[str, str]) -> list[str]:
    """Every gate the version did not pass: its checkpoint's, then each SM's it holds, then each runtime check's."""
    failures = []
    checks = _gate_keys(tags)
    for what, key in checks:
        if tags.get(key) != "pass":
            failures.append(f"{what}: {tags.get(key + _FAILURES) or 'no gate result recorded'}")
    return failures


def checkpoint_tags(*, publish_key: str, recipe: str, recipe_digest: str, variant: str, source: str, revision: str,
                    quant: str, kv_cache: str, backend: str = "modelopt", algorithm: str, export_quant_algo: str, group_size: str,
                    metrics: Mapping[str, object], tools: Mapping[str, str], passed: bool, failures,
                    runtimes: Mapping[str, str] | None = None, auto: Mapping[str, str] | None = None,
                    structure: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a variant's version carries: who published it from what, its format (quant auto: its budget and
    layer formats, auto_tags), the runtimes that load it, its structure checks (structure_tags), its metrics, tools
    and gate."""
    return {PUBLISH_KEY: publish_key, RECIPE: recipe, RECIPE_DIGEST: recipe_digest, VARIANT: variant,
            SOURCE: source, REVISION: revision, QUANT: quant, KV_CACHE: kv_cache, BACKEND: backend, ALGORITHM: algorithm,
            EXPORT_QUANT_ALGO: export_quant_algo, GROUP_SIZE: group_size, **{AUTO + k: v for k, v in (auto or {}).items()},
            **runtime_tags(runtimes or {}), **metric_tags(metrics), **tool_tags(tools), **gate_tags(passed, failures),
            **(structure or {})}


def structure_tags(structure: Mapping | None, expert_tokens: Mapping[str, list[int]]) -> dict[str, str]:
    """The structure checks on a version (structure.json in the artifact holds every problem) and, for a
    mixture-of-experts model, the expert that got the fewest calibration tokens (kiln.json holds the table)."""
    tags = {}
    if structure is not None:
        checked = ", ".join(f"{name} {count}" for name, count in structure["checked"].items())
        problems = structure["problems"]
        tags[STRUCTURE] = (f"failed: {len(problems)} problem{'s' if len(problems) != 1 else ''}; checked {checked}"
                           if problems else f"passed; checked {checked}")
    if expert_tokens:
        fewest, block, expert = min((n, block, i) for block, counts in expert_tokens.items()
                                    for i, n in enumerate(counts))
        widths = "/".join(str(w) for w in sorted({len(counts) for counts in expert_tokens.values()}))
        tags[EXPERTS] = (f"{len(expert_tokens)} MoE blocks x {widths} experts; fewest calibration tokens: {fewest} "
                         f"({block} expert {expert})")
    return tags


def auto_tags(auto: Mapping[str, object], layer_formats: Mapping[str, str],
              candidates: list[dict] = ()) -> dict[str, str]:
    """Quant auto on a version: the requested and measured bits, how many layers took each format, the digest of
    the whole layer map (kiln.json in the artifact holds the map itself; a tag is too small), and a size search's
    candidates ({effective_bits, bits_per_weight, mean_kl, passed}, smallest first) as compact JSON."""
    counts = Counter(layer_formats.values())
    tags = {"effective_bits": str(auto["effective_bits"]), "measured_bits": str(auto["measured_bits"]),
            "formats": " ".join(f"{fmt}:{n}" for fmt, n in sorted(counts.items())),
            "layers_sha256": canonical_digest(dict(layer_formats))}
    if candidates:
        tags[SEARCH_CANDIDATES] = json.dumps(list(candidates), separators=(",", ":"), sort_keys=True)
    return tags


def search_candidates(tags: Mapping[str, str]) -> list[dict]:
    """The size search's candidates a version records (none for a version that did not search)."""
    return json.loads(tags.get(AUTO + SEARCH_CANDIDATES, "[]"))


def engine_tags(sm: str, *, target: str, tensorrt: str, tensorrt_llm: str, gpu: str,
                metrics: Mapping[str, object], passed: bool, failures) -> dict[str, str]:
    """What one SM's engines add to the version: what built them, their engine-check metrics and gate."""
    return {sm_tag(sm, SM_TARGET): target, sm_tag(sm, SM_TENSORRT): tensorrt,
            sm_tag(sm, SM_TENSORRT_LLM): tensorrt_llm, sm_tag(sm, SM_GPU): gpu,
            **metric_tags(metrics, sm), **gate_tags(passed, failures, sm)}


def promotion_tag(alias: str, field: str) -> str:
    return f"{PROMOTION}.{alias}.{field}"
