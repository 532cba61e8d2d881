"""Check an exported TensorRT-LLM checkpoint against the source model.

ModelOpt's TensorRT-LLM export has been seen to write a wrong `head_size` (INT4-AWQ)
and to drop `rotary_base` / `rotary_scaling` under transformers 5, and it writes none
of a family's own fields (Qwen's `qwen_type`, ...) unless `tensorrt_llm` imports beside
it. TensorRT-LLM would build a wrong engine from such a config without complaint. So kiln
derives each field from the source `config.json` as TensorRT-LLM's `from_hugging_face`
does (the family table lists them), compares, corrects what the source and the tensor
shapes prove, and refuses everything else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kiln.common.errors import KilnError
from kiln.common.fsutil import atomic_write_text
from kiln.quantize.formats import FORMATS, MIXED_PRECISION
from kiln.quantize.families import COMMON_TRTLLM_FIELDS, Family, family_of, trtllm_values_agree
from kiln.quantize.headers import safetensors_header

# TensorRT-LLM stores INT4 weights two to a byte packed along the output dimension,
# NVFP4 weights two to a byte packed along the input dimension (the format table's TrtllmMapping.packing).
_PACKED_INT4_ALGOS = {s.export_quant_algo for s in FORMATS.values() if s.trtllm and s.trtllm.packing == "int4"}
_PACKED_FP4_ALGOS = {s.export_quant_algo for s in FORMATS.values() if s.trtllm and s.trtllm.packing == "fp4"}
# A MIXED_PRECISION checkpoint's per-layer config: TensorRT-LLM reads it beside config.json.
MIXED_LAYER_CONFIG = "quant_cfg.json"


class ExportCheckError(KilnError):
    exit_code = 1


@dataclass(frozen=True)
class Correction:
    field: str
    exported: Any
    corrected: Any
    evidence: str

    def as_dict(self) -> dict:
        return {"field": self.field, "exported": self.exported, "corrected": self.corrected, "evidence": self.evidence}


def _rope(source: dict, default_theta: float = 10000.0) -> tuple[float, dict | None]:
    """(theta, scaling) from either transformers 5's `rope_parameters` or 4.x's `rope_theta`/`rope_scaling`."""
    params = dict(source.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or source.get("rope_theta") or default_theta
    scaling = params if params.get("rope_type", "default") != "default" else source.get("rope_scaling")
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type"))
    # TensorRT-LLM reads the HF 4.x dict as is and looks up `type` (older) or `rope_type`.
    trt = {k: v for k, v in scaling.items() if k not in ("rope_theta",)}
    trt["type"] = kind
    trt["rope_type"] = kind
    return float(theta), trt


def expected_fields(source: dict, family: Family | None = None) -> dict[str, Any]:
    """The TensorRT-LLM config fields that must describe the source model: the common ones, then the family's."""
    heads = source["num_attention_heads"]
    checkpoint = family.trtllm if family else None
    theta, scaling = _rope(source, checkpoint.rope_theta_default if checkpoint else 10000.0)
    common = {
        "hidden_size": source["hidden_size"],
        "num_attention_heads": heads,
        "num_key_value_heads": source.get("num_key_value_heads") or heads,
        "head_size": source.get("head_dim") or source["hidden_size"] // heads,
        "intermediate_size": source["intermediate_size"],
        "vocab_size": source["vocab_size"],
        "num_hidden_layers": source["num_hidden_layers"],
        "max_position_embeddings": source["max_position_embeddings"],
        "norm_epsilon": source.get("rms_norm_eps", source.get("layer_norm_eps")),
        "rotary_base": theta,
        "rotary_scaling": scaling,
    }
    return {**common, **{f.name: f.value(source) for f in (checkpoint.fields if checkpoint else ())}}


# Fields that shape no tensor: the source config alone proves the right value.
_FROM_SOURCE_ALONE = {"max_position_embeddings", "norm_epsilon", "rotary_base", "rotary_scaling"}


def _tensor_problems(family: Family, fields: dict, tensors: dict) -> list[str]:
    """Boolean family fields that the checkpoint's tensors contradict (present where the field says absent, ...)."""
    problems = []
    for spec in family.trtllm.fields:
        if spec.tensor is None:
            continue
        present = [spec.tensor.format(i=i) in tensors for i in range(fields["num_hidden_layers"])]
        if any(p != bool(fields[spec.name]) for p in present):
            problems.append(f"{spec.name} is {fields[spec.name]} by TensorRT-LLM's rule ({spec.source}), but "
                            f"{spec.tensor.format(i='*')} is {'present' if any(present) else 'absent'} in the checkpoint")
    return problems


def _logical_shape(shape: tuple[int, ...], dtype: str, quant_algo: str | None) -> tuple[int, ...]:
    if quant_algo in _PACKED_INT4_ALGOS and dtype in ("I8", "U8") and len(shape) == 2:
        return (shape[0] * 2, shape[1])
    if quant_algo in _PACKED_FP4_ALGOS and dtype in ("I8", "U8") and len(shape) == 2:
        return (shape[0], shape[1] * 2)
    return shape


def _read_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor shapes and dtypes from a safetensors header, without loading data."""
    return {name: (tuple(info["shape"]), info["dtype"]) for name, info in safetensors_header(path).items()}


def _expected_shapes(fields: dict, tp: int, shared_embedding: bool) -> dict[str, tuple[int, int]]:
    hidden, inter, vocab = fields["hidden_size"], fields["intermediate_size"], fields["vocab_size"]
    q_width = fields["num_attention_heads"] * fields["head_size"]
    qkv_rows = (fields["num_attention_heads"] + 2 * fields["num_key_value_heads"]) * fields["head_size"]
    shapes = {"transformer.vocab_embedding.weight": (vocab, hidden)}
    if not shared_embedding:
        shapes["lm_head.weight"] = (vocab // tp, hidden)
    for i in range(fields["num_hidden_layers"]):
        layer = f"transformer.layers.{i}"
        shapes[f"{layer}.attention.qkv.weight"] = (qkv_rows // tp, hidden)
        shapes[f"{layer}.attention.dense.weight"] = (hidden, q_width // tp)
        shapes[f"{layer}.mlp.fc.weight"] = (inter // tp, hidden)
        shapes[f"{layer}.mlp.gate.weight"] = (inter // tp, hidden)
        shapes[f"{layer}.mlp.proj.weight"] = (hidden, inter // tp)
    return shapes


def _layer_algos(checkpoint_dir: Path, exported: dict, where: str) -> Callable[[str], str | None]:
    """Each tensor's quant_algo: the checkpoint's, or for MIXED_PRECISION its layer's in quant_cfg.json."""
    quant = exported.get("quantization") or {}
    if quant.get("quant_algo") != MIXED_PRECISION:
        return lambda tensor: quant.get("quant_algo")
    path = Path(checkpoint_dir) / MIXED_LAYER_CONFIG
    if not path.is_file():
        raise ExportCheckError(f"{where}: quant_algo is {MIXED_PRECISION} but {MIXED_LAYER_CONFIG}, where TensorRT-LLM "
                               "reads each layer's format, is missing")
    layers = json.loads(path.read_text())
    if layers.get("kv_cache_quant_algo") != quant.get("kv_cache_quant_algo"):
        raise ExportCheckError(f"{where}: {MIXED_LAYER_CONFIG} says kv_cache_quant_algo "
                               f"{layers.get('kv_cache_quant_algo')}, config.json {quant.get('kv_cache_quant_algo')}")
    per_layer = {name: cfg.get("quant_algo") for name, cfg in (layers.get("quantized_layers") or {}).items()}
    return lambda tensor: per_layer.get(tensor.rsplit(".", 1)[0])


def _shape_problems(exported: dict, fields: dict, tensors: dict, algo_of: Callable[[str], str | None],
                    tp: int) -> list[str]:
    shared = bool(exported.get("share_embedding_table"))
    problems = []
    for name, want in _expected_shapes(fields, tp, shared).items():
        if name not in tensors:
            problems.append(f"{name} is missing")
            continue
        shape, dtype = tensors[name]
        if name == "transformer.vocab_embedding.weight" and exported.get("use_parallel_embedding"):
            want = (want[0] // tp, want[1]) if exported.get("embedding_sharding_dim", 0) == 0 else (want[0], want[1] // tp)
        got = _logical_shape(shape, dtype, algo_of(name))
        if tuple(got) != tuple(want):
            problems.append(f"{name} has shape {list(got)}, the source model implies {list(want)}")
    return problems


def check_trtllm_checkpoint(checkpoint_dir: Path, source_config: dict, tp_size: int, label: str = "") -> list[Correction]:
    """Verify (and correct in place) `config.json` of an exported TensorRT-LLM checkpoint.

    Returns the corrections made; raises ExportCheckError naming what cannot be proven.
    `label` names the checkpoint in messages (the folder may still be a temporary one).
    """
    config_path = Path(checkpoint_dir) / "config.json"
    where = f"{label}: TensorRT-LLM checkpoint" if label else str(checkpoint_dir)
    exported = json.loads(config_path.read_text())
    family = family_of(source_config)
    if family is None or family.trtllm is None:
        raise ExportCheckError(f"{where}: kiln's family table has no TensorRT-LLM checkpoint for model_type "
                               f"'{source_config.get('model_type')}'; it cannot prove this config")
    if exported.get("architecture") != family.trtllm.architecture:
        raise ExportCheckError(f"{where}: architecture is {exported.get('architecture')!r}, the family table says "
                               f"{family.trtllm.architecture!r} for model_type {family.model_type}")
    fields = expected_fields(source_config, family)
    algo_of = _layer_algos(checkpoint_dir, exported, where)
    mapping = exported.get("mapping") or {}
    if mapping.get("tp_size", 1) != tp_size:
        raise ExportCheckError(
            f"{where}: mapping.tp_size is {mapping.get('tp_size')}, the recipe asks for {tp_size}; "
            "re-export (fix: report this ModelOpt behaviour, kiln will not guess a sharding)"
        )
    rank_files = sorted(Path(checkpoint_dir).glob("rank*.safetensors"))
    if len(rank_files) != tp_size:
        raise ExportCheckError(f"{where}: {len(rank_files)} rank*.safetensors files for tp_size {tp_size}")
    tensors = _read_shapes(Path(checkpoint_dir) / "rank0.safetensors")

    if exported.get("share_embedding_table") and not source_config.get("tie_word_embeddings", False):
        raise ExportCheckError(
            f"{where}: share_embedding_table is true but the source model has a separate lm_head; "
            "an engine built from it would use the wrong output projection"
        )
    # The tensors are what the engine is built from: they must agree with the source model.
    problems = _shape_problems(exported, fields, tensors, algo_of, tp_size)
    problems += _tensor_problems(family, fields, tensors)
    if problems:
        raise ExportCheckError(
            f"{where}: tensors disagree with the source model: " + "; ".join(problems[:4])
            + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else "")
        )

    corrections = []
    family_fields = {spec.name: spec for spec in family.trtllm.fields}
    for field, want in fields.items():
        got = exported.get(field)
        if trtllm_values_agree(field, want, got):
            continue
        if field in _FROM_SOURCE_ALONE:
            evidence = "source config.json"
        elif field in COMMON_TRTLLM_FIELDS:
            # The tensor shapes above were checked against the source's value of this field.
            evidence = "source config.json and rank0.safetensors shapes"
        else:
            spec = family_fields[field]
            evidence = f"source config.json {spec.source}, as {family.trtllm.config_source} derives it"
            if spec.tensor:
                evidence += f"; rank0.safetensors {spec.tensor.format(i='*')} {'present' if want else 'absent'}"
        if want is None and field == "rotary_scaling":
            exported.pop(field, None)
        else:
            exported[field] = want
        corrections.append(Correction(field, got, want, evidence))
    if corrections:
        atomic_write_text(config_path, json.dumps(exported, indent=4) + "\n")
    return corrections
