"""The structure checks that read tensors (kiln.validate.structure): scales, per-layer formats, untouched tensors."""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from pathlib import Path

import torch

from kiln.quantize import MIXED_PRECISION
from kiln.validate.codecs import WEIGHT_CODECS
from kiln.validate.structure.records import (
    KV_SCALES, PACKED_NAMES, SCALE_NAMES, TOWERS, StructureExpectation, finite_positive,
    matches, summarise,
)

QUANTIZED_MARKERS = ("weight_scale", "weight_packed")   # a layer storing one of these is stored quantized


class Checkpoint:
    """A folder's safetensors, read a tensor at a time, and its configs."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        self._files = {path: safe_open(path, framework="pt") for path in sorted(folder.glob("*.safetensors"))}
        self._where = {name: path for path, handle in self._files.items() for name in handle.keys()}
        self.config = _json(folder / "config.json")
        self.quant = _json(folder / "hf_quant_config.json").get("quantization") or {}
        config_quant = self.config.get("quantization_config") or {}
        self.compressed = config_quant.get("quant_method") == "compressed-tensors"

    @property
    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._files[self._where[name]].get_tensor(name)

    def shape(self, name: str) -> list[int]:
        return self._files[self._where[name]].get_slice(name).get_shape()

    def stored_quantized(self, layer: str) -> bool:
        return any(f"{layer}.{marker}" in self for marker in QUANTIZED_MARKERS)

    def tied(self) -> bool:
        text = self.config.get("text_config") or {}
        return bool(self.config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))

    def decoder_layers(self) -> int:
        return int(self.config.get("num_hidden_layers") or (self.config.get("text_config") or {}).get(
            "num_hidden_layers") or 0)


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _short(name: str) -> str:
    return name.rsplit(".", 1)[0]


def linear_layers(source: Checkpoint) -> list[str]:
    """Every module of the source with a 2-D weight but the embeddings: what a format may quantize."""
    return sorted(_short(n) for n in source.names if n.endswith(".weight") and len(source.shape(n)) == 2
                  and "embed" not in _short(n).rsplit(".", 1)[-1])


def check_scales(export: Checkpoint) -> tuple[int, list[str]]:
    problems, count = [], 0
    for name in export.names:
        suffix = name.rsplit(".", 1)[-1]
        if suffix not in SCALE_NAMES:
            continue
        count += 1
        values = export[name]
        if values.dtype == torch.uint8:   # E8M0 exponents (MX formats): 255 is their NaN
            nan = int((values == 255).sum())
            wrong = f"{nan} of {values.numel()} E8M0 exponents are 255 (NaN)" if nan else None
        elif values.dtype == torch.float8_e4m3fn and _under_global_scale(export, _short(name)):
            # NVFP4 block scales: zero (a block below the E4M3 range) and subnormal values are the format's range.
            wrong = finite_positive(values, allow_zero=True, normal=False)
        elif values.is_floating_point():
            wrong = finite_positive(values)
        else:
            continue
        if wrong:
            problems.append(f"{name}: {wrong}")
    return count, summarise(problems)


def _under_global_scale(export: Checkpoint, layer: str) -> bool:
    return f"{layer}.weight_scale_2" in export or f"{layer}.weight_global_scale" in export


def declared_formats(export: Checkpoint, layers: list[str]) -> dict[str, tuple[str, int | None]] | None:
    """Layer -> (quant_algo, group size) for every layer ModelOpt's hf_quant_config.json quantizes; None for a
    checkpoint without one (compressed-tensors names its layers by matcher, kiln checks what each stores)."""
    if not export.quant:
        return None
    algo, group = export.quant.get("quant_algo"), export.quant.get("group_size")
    if algo == MIXED_PRECISION:
        return {name: (cfg.get("quant_algo"), cfg.get("group_size"))
                for name, cfg in (export.quant.get("quantized_layers") or {}).items()}
    excluded = export.quant.get("exclude_modules") or []
    return {layer: (algo, group) for layer in layers if algo and not any(fnmatchcase(layer, p) for p in excluded)}


def check_layers(export: Checkpoint, source: Checkpoint, expected: StructureExpectation) -> tuple[int, list[str]]:
    layers = linear_layers(source)
    problems = _config_problems(export, expected)
    declared = declared_formats(export, layers)
    if declared is not None and expected.quant_algo == MIXED_PRECISION:
        for layer in layers:
            have, want = (declared.get(layer) or ("none",))[0], expected.layer_formats.get(layer, "none")
            if have != want:
                problems.append(f"{layer}: hf_quant_config.json gives it {have}, the size search chose {want}")
    for layer in layers:
        stored = export.stored_quantized(layer)
        if declared is not None:
            problems += _declared_problems(export, layer, declared.get(layer), stored)
        problems += _intent_problems(layer, stored, expected)
    problems += _kv_problems(export, expected)
    return len(layers), summarise(problems)


def _config_problems(export: Checkpoint, expected: StructureExpectation) -> list[str]:
    if expected.quant_algo is None:   # compressed-tensors: no hf_quant_config.json
        return []
    problems = []
    if not export.quant:
        return ["hf_quant_config.json: missing; ModelOpt's export writes it (fix: rebuild the variant)"]
    algo, kv = export.quant.get("quant_algo"), export.quant.get("kv_cache_quant_algo")
    if algo != expected.quant_algo:
        problems.append(f"hf_quant_config.json: quant_algo is {algo}, the plan made {expected.quant_algo}")
    if kv != expected.kv_cache_quant_algo:
        problems.append(f"hf_quant_config.json: kv_cache_quant_algo is {kv}, the plan made "
                        f"{expected.kv_cache_quant_algo}")
    config_quant = export.config.get("quantization_config") or {}
    if config_quant.get("quant_algo") != algo:
        problems.append(f"config.json: quantization_config.quant_algo is {config_quant.get('quant_algo')}, "
                        f"hf_quant_config.json's is {algo} (runtimes read config.json)")
    elif algo != MIXED_PRECISION and sorted(config_quant.get("ignore") or []) != sorted(
            export.quant.get("exclude_modules") or []):
        problems.append(f"config.json: quantization_config.ignore {sorted(config_quant.get('ignore') or [])} is not "
                        f"hf_quant_config.json's exclude_modules {sorted(export.quant.get('exclude_modules') or [])}")
    return problems


def _declared_problems(export: Checkpoint, layer: str, declared: tuple[str, int | None] | None,
                       stored: bool) -> list[str]:
    if declared and not stored:
        return [f"{layer}: hf_quant_config.json quantizes it ({declared[0]}) but it stores no weight_scale: "
                "the layer was skipped"]
    if stored and not declared:
        return [f"{layer}: stores scales but hf_quant_config.json leaves it 16-bit"]
    if not declared:
        return []
    codec = WEIGHT_CODECS.get(declared[0])
    if codec is None:
        return [f"{layer}: quant_algo {declared[0]} has no codec in kiln's reference runtime"]
    try:
        codec(layer, _LayerTensors(export, layer), declared[1])
    except (ValueError, KeyError) as exc:
        return [f"{layer}: {str(exc).strip(chr(39))}"]
    return []


class _LayerTensors:
    """One layer's tensors as a mapping, read on demand (what a codec looks up)."""

    def __init__(self, export: Checkpoint, layer: str):
        self.export, self.layer = export, layer

    def __contains__(self, name: str) -> bool:
        return name.startswith(f"{self.layer}.") and name in self.export

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self:
            raise KeyError(name)
        return self.export[name]


def _intent_problems(layer: str, stored: bool, expected: StructureExpectation) -> list[str]:
    excluded = next((p for p in expected.exclude if matches(layer, p)), None)
    outside_only = bool(expected.only) and not any(matches(layer, p) for p in expected.only)
    if stored and excluded:
        return [f"{layer}: the recipe excludes it ({excluded}) but the export quantizes it"]
    if stored and outside_only:
        return [f"{layer}: outside the recipe's only: patterns, but the export quantizes it"]
    tower = next((t for t in TOWERS if t in layer.lower()), None)
    if stored and tower and not expected.only:
        return [f"{layer}: a module outside the language model ({tower}) was quantized (fix: name it in `only:` if "
                "that is meant)"]
    default = any(fnmatchcase(f"{layer}.weight_quantizer", p) for p in expected.unquantized_by_default) \
        or expected.layer_formats.get(layer) == "none"   # a size search chose 16 bits for it
    if not stored and not excluded and not outside_only and not default and not tower \
            and expected.quant_algo is not None:
        return [f"{layer}: the recipe quantizes it, but the export leaves it 16-bit"]
    return []


def _kv_problems(export: Checkpoint, expected: StructureExpectation) -> list[str]:
    """A quantized KV cache stores k_scale and v_scale for every decoder layer's attention; none otherwise."""
    counts = {s: sum(1 for n in export.names if n.endswith(f".{s}")) for s in KV_SCALES}
    layers = export.decoder_layers()
    if expected.kv_cache_quant_algo and expected.quant_algo is not None:
        return [f"{s}: {n} of {layers} decoder layers store it (fix: rebuild the variant; a KV cache without its "
                "scales is read with the wrong range)" for s, n in counts.items() if n != layers]
    return [f"{s}: {n} layers store it, but the plan quantizes no KV cache" for s, n in counts.items() if n]


def check_untouched(export: Checkpoint, source: Checkpoint, expected: StructureExpectation) -> tuple[int, list[str]]:
    """Every source tensor the format leaves alone is in the export, bit for bit; the export adds only scales and
    the packed weights of the layers it quantizes."""
    if not source.names:
        return 0, []   # a source without safetensors (pickled weights): nothing to compare tensor by tensor
    problems, count = [], 0
    quantized = {layer for layer in linear_layers(source) if export.stored_quantized(layer)}
    for name in source.names:
        if name.endswith(".weight") and _short(name) in quantized:
            continue   # the format's own bytes: the layers check reads them with the format's codec
        if name not in export:
            if len(source.shape(name)) == 3 or (name == "lm_head.weight" and export.tied()):
                continue   # fused experts (exported one module per expert), or an output head tied to the embeddings
            problems.append(f"{name}: in the source, missing from the export")
            continue
        count += 1
        wrong = _differs(export[name], source[name])
        if wrong and expected.norms_may_change and "norm" in name.lower():
            finite = bool(torch.isfinite(export[name].float()).all())
            wrong = None if finite else "not finite after scales were folded in"
        if wrong:
            problems.append(f"{name}: {wrong}, though the recipe's format leaves it alone")
    for name in export.names:
        suffix = name.rsplit(".", 1)[-1]
        if name in source or suffix in KV_SCALES or _short(name) in quantized:
            continue
        stray = suffix in SCALE_NAMES + PACKED_NAMES
        problems.append(f"{name}: the export adds a tensor the source does not have"
                        + (f" ({suffix} on a layer that stores no quantized weight)" if stray else ""))
    if export.tied() and "lm_head.weight" in export:
        embed = next((n for n in export.names if n.endswith("embed_tokens.weight")), None)
        if embed and _differs(export["lm_head.weight"], export[embed]):
            problems.append("lm_head.weight: differs from the embeddings the config ties it to (untied)")
    return count, summarise(problems)


def _differs(exported: torch.Tensor, source: torch.Tensor) -> str | None:
    """How an exported tensor differs from the source's (cast to the exported dtype, as a load in that dtype
    would), or None when it is bit-identical."""
    if tuple(exported.shape) != tuple(source.shape):
        return f"shape {tuple(exported.shape)}, the source's is {tuple(source.shape)}"
    if exported.dtype != source.dtype:
        if not (exported.is_floating_point() and source.is_floating_point()):
            return f"stored as {exported.dtype}, the source's as {source.dtype}"
        source = source.to(exported.dtype)
    a, b = exported.contiguous().reshape(-1).view(torch.uint8), source.contiguous().reshape(-1).view(torch.uint8)
    if torch.equal(a, b):
        return None
    size = exported.element_size()
    changed = int((a != b).reshape(-1, size).any(dim=1).sum())
    return f"{changed} of {exported.numel()} values differ from the source's"
