"""What the structure checks are held to and what they found (kiln.validate.structure), and their helpers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

STRUCTURE = "structure.json"
STRUCTURE_VERSION = 1   # in the validate key: a change of the checks re-checks every checkpoint
SCALE_NAMES = ("weight_scale", "weight_scale_2", "weight_global_scale", "input_scale", "input_global_scale",
               "pre_quant_scale", "k_scale", "v_scale")
# compressed-tensors' other per-layer tensors beside a packed weight.
PACKED_NAMES = ("weight_packed", "weight_shape", "weight_zero_point", "input_zero_point", "weight_g_idx")
KV_SCALES = ("k_scale", "v_scale")
# Modules outside the language model: a recipe quantizes them only by naming them in `only`.
TOWERS = ("vision", "visual", "audio", "speech", "multi_modal_projector", "image")
# Encoded by both tokenizers: spaces, digits, accents, CJK, a chat marker, code.
PROBE_TEXT = "kiln checks: Hello, world! 1234 \u00e9\u00e8 \u4f60\u597d <|im_start|> \n\tdef f(x): return x"
IGNORED_CONFIG_KEYS = ("quantization_config", "transformers_version", "_name_or_path")


@dataclass(frozen=True)
class StructureExpectation:
    """What the plan said the checkpoint holds (the pipeline fills it from the quantize stage's kiln.json)."""

    quant_algo: str | None                # the export label; MIXED_PRECISION for auto; None for compressed-tensors
    kv_cache_quant_algo: str | None = None
    layer_formats: dict[str, str] = field(default_factory=dict)   # auto: layer -> export label ("none": chosen 16-bit)
    exclude: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    unquantized_by_default: tuple[str, ...] = ()   # what the quantizer leaves 16-bit whatever the recipe says
    norms_may_change: bool = False        # AWQ / SmoothQuant fold their input scales into the norms before layers
    trust_remote_code: bool = False
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)   # MoE block -> calibration tokens per expert
    min_expert_tokens: int = 1
    allowed_differences: tuple[str, ...] = ()   # evaluation.allow_differences: files.DIFFERENCES listed, not refused
    dtype: str | None = None   # model.dtype the export was made in: config.json's dtype is held to it, not the source's


@dataclass(frozen=True)
class StructureReport:
    """How many items each check looked at, and what it found wrong (one line each)."""

    checked: dict[str, int]
    problems: tuple[str, ...]
    allowed: tuple[str, ...] = ()   # differences from the source the recipe allows: listed, not refused

    @property
    def passed(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        document = {"checked": self.checked, "problems": list(self.problems)}
        if self.allowed:
            document["allowed"] = list(self.allowed)
        return document

    @classmethod
    def from_dict(cls, document: dict) -> "StructureReport":
        return cls(dict(document["checked"]), tuple(document["problems"]), tuple(document.get("allowed", ())))


def write_structure(report: StructureReport, out_dir: Path) -> None:
    (Path(out_dir) / STRUCTURE).write_text(json.dumps(report.as_dict(), indent=2, sort_keys=True) + "\n")


def load_structure(out_dir: Path) -> StructureReport | None:
    """The entry's structure report; None for an entry written before structure checks."""
    path = Path(out_dir) / STRUCTURE
    return StructureReport.from_dict(json.loads(path.read_text())) if path.exists() else None


def matches(name: str, pattern: str) -> bool:
    """Module `name` is `pattern` or lies under a module it names (exclude and only apply as `pattern.*`)."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, f"{pattern}.*")


def summarise(problems: list[str], limit: int = 8) -> list[str]:
    """At most `limit` lines, the last saying how many more there were."""
    if len(problems) <= limit:
        return problems
    return [*problems[: limit - 1], f"... and {len(problems) - limit + 1} more problems of the same checks"]


def finite_positive(values, allow_zero: bool = False, normal: bool = True) -> str | None:
    """What is wrong with these scale values (a float tensor), or None: NaN, infinite, negative, zero (unless
    `allow_zero`) or subnormal in the dtype they are stored in (unless not `normal`)."""
    import torch

    tiny = torch.finfo(values.dtype).tiny   # subnormal in the dtype it is stored in
    values = values.to(torch.float32) if values.dtype not in (torch.float32, torch.float64) else values
    total = values.numel()
    bad = []
    for what, mask in (("NaN", torch.isnan(values)), ("infinite", torch.isinf(values)),
                       ("negative", values < 0), ("zero", (values == 0) if not allow_zero else None)):
        if mask is None:
            continue
        count = int(mask.sum())
        if count:
            bad.append(f"{count} of {total} {'is' if total == 1 else 'are'} {what}")
    if normal and not bad:
        count = int(((values.abs() < tiny) & (values != 0)).sum())
        if count:
            bad.append(f"{count} of {total} {'is' if total == 1 else 'are'} subnormal")
    return ", ".join(bad) or None
