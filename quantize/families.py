"""The model-family table: the only place kiln looks up what it knows about a model family.

One row per Hugging Face `model_type`, like compile/gpus.py is for GPUs. Each row says:
- whether kiln writes a TensorRT-LLM checkpoint for the family (the `trtllm-engine` target), and if so
  the TensorRT-LLM architecture and model class and every family field TensorRT-LLM's
  `config_class.from_hugging_face` derives from the source `config.json` beyond the common ones;
  ModelOpt fills those only when `tensorrt_llm` imports beside it, which it never does on a
  quantize host, so kiln fills and proves them itself (quantize/trtllm_checks.py);
- the formats TensorRT-LLM supports for the family, per target, as the columns of TensorRT-LLM's support
  matrices (each format row names its column, so a new format of a listed column needs no edit here),
  and the KV-cache formats;
- what the reference runtime must know (the MoE tensor layout of ModelOpt's HF export).

Sources: SOURCES below, cited per row by tag.
A format set marked "inferred" has no row in TensorRT-LLM's matrices: kiln allows the formats of the
nearest documented row whose modules the family's TensorRT-LLM model reuses, and says so in the README.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from kiln.quantize.formats import FORMATS, KV_CACHE_FORMATS, KVCacheFormat, QuantFormat



# What each tag in a row cites (TensorRT-LLM unless said otherwise).
SOURCES = {
    "[llama-cfg]": "tensorrt_llm/models/llama/config.py, LLaMAConfig.from_hugging_face",
    "[qwen-cfg]": "tensorrt_llm/models/qwen/config.py, QWenConfig.from_hugging_face",
    "[model-map]": "tensorrt_llm/models/__init__.py, MODEL_MAP (architecture -> engine-flow model class)",
    "[precision]": "docs/source/reference/precision.md, per-model matrix of the engine flow (FP8, W8A8 SQ, W8A16, "
                   "W4A16 AWQ, W4A16 GPTQ)",
    "[pt-matrix]": "docs/source/features/quantization.md, \"Model Supported Matrix\" of the PyTorch backend (NVFP4, "
                   "FP8 per tensor, FP8 rowwise, FP8 KV, W4A8 AWQ, W4A16 AWQ, W4A16 GPTQ)",
    "[modelopt]": "ModelOpt 0.47 convert_to_tensorrt_llm_config: without tensorrt_llm it knows the family fields of "
                  "gpt, gemma (1), llama, qwen, mpt, dbrx, mllama and some encoder-decoders, and raises "
                  "NotImplementedError for the rest",
    "[linear]": "inferred for the 2026 formats (FP8 block scaling, W4A16 NVFP4, MXFP8, MXFP4, W4A8 NVFP4 FP8, W4A8 "
                "MXFP4 FP8), which no matrix row lists for "
                "these families: the runtimes pick each linear layer's method from the checkpoint's quant_algo, not by "
                "model (TensorRT-LLM _torch/modules/linear.py get_quant_method; vLLM modelopt.py LINEAR_ALGOS); "
                "quantize/runtimes.py says which runtime loads which",
    "[measured]": "kiln on a CPU host with ModelOpt 0.47 and transformers 5.24 (tests/test_families.py)",
}

# The TensorRT-LLM config fields every decoder family shares (checked for every family with a checkpoint).
COMMON_TRTLLM_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_size", "intermediate_size",
                        "vocab_size", "num_hidden_layers", "max_position_embeddings", "norm_epsilon", "rotary_base",
                        "rotary_scaling")


def trtllm_values_agree(field: str, written: Any, reference: Any) -> bool:
    """Whether a TensorRT-LLM config value kiln wrote (or wants written) matches a reference value: floats
    within rounding, RoPE scaling whether it names its kind `type` or `rope_type`, and dicts such as `moe`
    key by key over what kiln writes (the reference may fill more keys at their defaults)."""
    if field == "rotary_scaling" and isinstance(written, dict) and isinstance(reference, dict):
        def kinds(value: dict) -> dict:
            kind = value.get("rope_type", value.get("type"))
            return {**{k: v for k, v in value.items() if k not in ("type", "rope_type")}, "rope_type": kind}
        return kinds(written) == kinds(reference)
    if isinstance(written, dict) and isinstance(reference, dict):
        return all(trtllm_values_agree(f"{field}.{key}", value, reference.get(key)) for key, value in written.items())
    if isinstance(written, float) or isinstance(reference, float):
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (written, reference))
        return numbers and abs(written - reference) <= 1e-12 * max(1.0, abs(reference))
    return written == reference


@dataclass(frozen=True)
class FamilyField:
    """One TensorRT-LLM config field and how TensorRT-LLM's own converter derives it from the source config."""

    name: str
    value: Callable[[dict], Any]
    source: str                        # where the value comes from, said in corrections and the README
    # A per-layer tensor of the TensorRT-LLM checkpoint ({i}: layer index) whose presence must equal the
    # (boolean) value: the shapes then prove the field, not only the source config.
    tensor: str | None = None


@dataclass(frozen=True)
class TrtllmCheckpoint:
    architecture: str                  # config.json "architecture": the MODEL_MAP key
    model_class: str                   # the engine-flow class MODEL_MAP maps it to [model-map]
    config_source: str                 # the from_hugging_face every field below is read from
    fields: tuple[FamilyField, ...]
    rope_theta_default: float = 10000.0


@dataclass(frozen=True)
class ExpertLayout:
    """How ModelOpt's HF export names a sparse-MoE block: the transformers 4 layout, one tensor set per
    expert (what TensorRT-LLM's PyTorch backend reads); transformers 5 fuses the experts instead."""

    block: str                         # the exported block under a layer ("block_sparse_moe" or "mlp")
    gate: str
    up: str
    down: str


@dataclass(frozen=True)
class Family:
    model_type: str
    title: str
    architecture: str                  # the transformers class
    trtllm: TrtllmCheckpoint | None    # None: no TensorRT-LLM checkpoint; the HF checkpoint serves
    no_trtllm_reason: str | None
    engine_columns: frozenset[str]     # TensorRT-LLM matrix columns (TrtllmMapping.matrix) of the engine flow
    pytorch_columns: frozenset[str]    # and of the PyTorch backend
    kv_dtypes: frozenset[str]          # the KV cache dtypes its sources list (KVCacheSpec.runtime_dtype)
    formats_source: str
    experts: ExpertLayout | None = None
    notes: tuple[str, ...] = field(default=())

    def formats_for(self, target: str) -> frozenset[QuantFormat]:
        """The formats whose matrix column the target's source lists for this family."""
        columns = self.engine_columns if target == "trtllm-engine" else self.pytorch_columns
        return frozenset(quant for quant, spec in FORMATS.items() if spec.trtllm and spec.trtllm.matrix in columns)

    @property
    def kv_formats(self) -> frozenset[KVCacheFormat]:
        """The KV formats whose cache dtype the family takes (read from the KV table: new rows need no edit here), less
        those kiln refuses everywhere."""
        return frozenset(kv for kv, spec in KV_CACHE_FORMATS.items()
                         if spec.runtime_dtype in self.kv_dtypes and not spec.unsupported)

    @property
    def engine_formats(self) -> frozenset[QuantFormat]:
        return self.formats_for("trtllm-engine")

    @property
    def pytorch_formats(self) -> frozenset[QuantFormat]:
        return self.formats_for("trtllm-pytorch")

    @property
    def trtllm_field_names(self) -> tuple[str, ...]:
        return COMMON_TRTLLM_FIELDS + tuple(f.name for f in self.trtllm.fields) if self.trtllm else ()


def _act(source: dict) -> str:
    return source.get("hidden_act") or source.get("hidden_activation") or "silu"


_QKV_BIAS = "transformer.layers.{i}.attention.qkv.bias"


_LLAMA_FIELDS = (
    FamilyField("hidden_act", _act, "hidden_act"),
    FamilyField("attn_bias", lambda s: bool(s.get("bias") or s.get("attention_bias")),
                "bias or attention_bias", tensor=_QKV_BIAS),
)


def _qwen_fields(attn_bias: bool) -> tuple[FamilyField, ...]:
    # QWenConfig.from_hugging_face sets qwen_type from model_type and hard-codes attn_bias by it
    # (True for qwen2, False for qwen3); the checkpoint's qkv bias tensors must agree.
    return (
        FamilyField("qwen_type", lambda s: s["model_type"], "model_type"),
        FamilyField("attn_bias", lambda s: attn_bias, f"model_type ({'qkv bias' if attn_bias else 'no qkv bias'})",
                    tensor=_QKV_BIAS),
        FamilyField("hidden_act", _act, "hidden_act"),
        FamilyField("seq_length", lambda s: s.get("seq_length", 8192), "seq_length (default 8192)"),
        FamilyField("use_logn_attn", lambda s: bool(s.get("use_logn_attn", False)), "use_logn_attn (default false)"),
        FamilyField("moe_intermediate_size", lambda s: s.get("moe_intermediate_size", 0), "moe_intermediate_size"),
        FamilyField("moe_shared_expert_intermediate_size", lambda s: s.get("shared_expert_intermediate_size", 0),
                    "shared_expert_intermediate_size"),
        FamilyField("moe", lambda s: {"num_experts": s.get("num_experts", 0), "top_k": s.get("num_experts_per_tok", 0),
                                      "normalization_mode": 0},
                    "num_experts, num_experts_per_tok; normalization NONE"),
    )


def _columns(*names: str) -> frozenset[str]:
    return frozenset(names)


_FP8, _FP8_ROWWISE, _NVFP4 = "FP8", "FP8 rowwise", "NVFP4"
_AWQ, _GPTQ, _W4A8, _SQ, _W8A16 = "W4A16 AWQ", "W4A16 GPTQ", "W4A8 AWQ", "W8A8 SQ", "W8A16"
_FP8_BLOCK, _NVFP4_A16, _MXFP8 = "FP8 block scaling", "W4A16 NVFP4", "MXFP8"
_MXFP4, _W4A8_NVFP4, _W4A8_MXFP4 = "MXFP4", "W4A8 NVFP4 FP8", "W4A8 MXFP4 FP8"
# [linear]: the dense families' HF checkpoints in the 2026 formats (the MoE rows wait for a measured expert export).
_LINEAR_2026 = _columns(_FP8_BLOCK, _NVFP4_A16, _MXFP8, _MXFP4, _W4A8_NVFP4, _W4A8_MXFP4)
# The columns of TensorRT-LLM's support matrices the rows below read: a format's TrtllmMapping.matrix must be one
# (quantize.register_format and tests/test_format_table.py check), or no family would ever take it.
MATRIX_COLUMNS = frozenset({_FP8, _FP8_ROWWISE, _NVFP4, _AWQ, _GPTQ, _W4A8, _SQ, _W8A16}) | _LINEAR_2026
# [precision] LLaMA: FP8, SQ, W8A16, AWQ, GPTQ; [pt-matrix] LLaMA rows: NVFP4, FP8 rowwise, W4A8 AWQ
_LLAMA_ENGINE = _columns(_FP8, _FP8_ROWWISE, _NVFP4, _AWQ, _GPTQ, _W4A8, _SQ, _W8A16)
# [pt-matrix] LLaMA rows; [linear]
_LLAMA_PYTORCH = _columns(_FP8, _FP8_ROWWISE, _NVFP4, _AWQ, _GPTQ, _W4A8) | _LINEAR_2026
_QWEN_ENGINE = _columns(_FP8, _SQ, _W8A16, _AWQ, _GPTQ)   # [precision] Qwen; FP8: examples/qwen
_FP8_KV = frozenset({"auto", "fp8"})   # "auto": an unquantized cache in the model's dtype
_NO_ENGINE = frozenset()


def _modelopt_cannot(model_type: str) -> str:
    return (f"ModelOpt 0.47 writes no TensorRT-LLM checkpoint for {model_type}: without tensorrt_llm beside it, it "
            "raises NotImplementedError and points to TensorRT-LLM's PyTorch backend [modelopt]")


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "Llama 2, 3.x", "LlamaForCausalLM",
           TrtllmCheckpoint("LlamaForCausalLM", "LLaMAForCausalLM", "[llama-cfg]", _LLAMA_FIELDS),
           None, _LLAMA_ENGINE, _LLAMA_PYTORCH, frozenset({"auto", "fp8", "nvfp4"}),
           "[precision] LLaMA; [pt-matrix] LLaMA, LLaMA-v2, LLaMA 3; [linear]"),
    Family("mistral", "Mistral", "MistralForCausalLM",
           TrtllmCheckpoint("MistralForCausalLM", "LLaMAForCausalLM", "[llama-cfg]", _LLAMA_FIELDS),
           None, _LLAMA_ENGINE, _columns(_FP8, _AWQ) | _LINEAR_2026, _FP8_KV,
           "engine: MODEL_MAP builds Mistral with LLaMAForCausalLM, so Llama's formats [model-map]; "
           "PyTorch backend: [pt-matrix] Mistral; [linear]",
           notes=("The engine flow ignores sliding_window (LLaMAConfig has no such field): kiln refuses "
                  "trtllm-engine when the window is shorter than build.max_seq_len.",)),
    Family("qwen2", "Qwen2, Qwen2.5", "Qwen2ForCausalLM",
           TrtllmCheckpoint("Qwen2ForCausalLM", "QWenForCausalLM", "[qwen-cfg]", _qwen_fields(True), 100000.0),
           None, _QWEN_ENGINE, _columns(_FP8, _NVFP4, _W4A8, _AWQ, _GPTQ) | _LINEAR_2026, _FP8_KV,
           "[precision] Qwen (FP8 from examples/models/core/qwen); [pt-matrix] Qwen-2/2.5; [linear]"),
    Family("qwen3", "Qwen3", "Qwen3ForCausalLM",
           TrtllmCheckpoint("Qwen3ForCausalLM", "QWenForCausalLM", "[qwen-cfg]", _qwen_fields(False), 100000.0),
           None, _QWEN_ENGINE, _columns(_FP8, _NVFP4, _AWQ, _GPTQ) | _LINEAR_2026, _FP8_KV,
           "[precision] Qwen; [pt-matrix] Qwen-3; [linear]",
           notes=("The q/k norms are exported as attention.q_layernorm / k_layernorm; qwen_type qwen3 "
                  "is what makes TensorRT-LLM's QWenDecoderLayer read them.",)),
    Family("gemma2", "Gemma 2", "Gemma2ForCausalLM", None, _modelopt_cannot("gemma2"),
           _NO_ENGINE, _columns(_FP8, _AWQ, _W4A8) | _LINEAR_2026, _FP8_KV,
           "inferred: no Gemma 2 row in [pt-matrix]; Gemma 3's row, whose Linear/GatedMLP modules "
           "_torch/models/modeling_gemma2.py reuses; [linear]",
           notes=("Soft-capping (attn_logit_softcapping, final_logit_softcapping): the reference runtime keeps "
                  "the model's eager attention, and the KV-cache quantizer wraps that, not SDPA.",
                  "Embeddings are scaled by sqrt(hidden_size) and tied to the output projection.")),
    Family("gemma3_text", "Gemma 3 (text)", "Gemma3ForCausalLM", None, _modelopt_cannot("gemma3"),
           _NO_ENGINE, _columns(_FP8, _AWQ, _W4A8) | _LINEAR_2026, _FP8_KV, "[pt-matrix] Gemma 3; [linear]",
           notes=("Sliding-window and global layers alternate (layer_types); embeddings scaled and tied.",)),
    Family("phi3", "Phi-3, Phi-4", "Phi3ForCausalLM", None, _modelopt_cannot("phi3"),
           _NO_ENGINE, _columns(_FP8, _AWQ, _W4A8) | _LINEAR_2026, _FP8_KV,
           "inferred: [pt-matrix] has a Phi row (W4A8 AWQ, FP8 KV) but none for Phi-3; "
           "_torch/models/modeling_phi3.py uses the generic fused qkv / gate_up Linear modules (Llama's formats "
           "that ModelOpt exports for fused projections); [linear]",
           notes=("qkv_proj and gate_up_proj are fused in the checkpoint; the HF export keeps them fused.",)),
    Family("mixtral", "Mixtral (MoE)", "MixtralForCausalLM", None,
           "ModelOpt 0.47's TensorRT-LLM export fails on transformers 5's fused experts "
           "(TypeError: 'QuantMixtralExperts' has no len()) [measured]",
           _NO_ENGINE, _columns(_FP8, _NVFP4), _FP8_KV,
           "[pt-matrix] Mixtral; ModelOpt's HF export fails for INT4/W4A8 experts [measured]",
           experts=ExpertLayout("block_sparse_moe", gate="w1", up="w3", down="w2")),
    Family("qwen3_moe", "Qwen3-MoE", "Qwen3MoeForCausalLM", None,
           "the engine flow has no Qwen3MoeForCausalLM in MODEL_MAP [model-map]",
           _NO_ENGINE, _columns(_FP8, _NVFP4), _FP8_KV,
           "inferred: no Qwen3-MoE row in [pt-matrix]; Mixtral's MoE row (FP8, NVFP4) and Qwen-3's; "
           "ModelOpt's HF export fails for INT4/W4A8 experts [measured]",
           experts=ExpertLayout("mlp", gate="gate_proj", up="up_proj", down="down_proj")),
)}


def family_of(source_config: dict) -> Family | None:
    return FAMILIES.get(source_config.get("model_type", ""))


def known_families() -> str:
    return ", ".join(sorted(FAMILIES))


def family_problems(source_config: dict, variants: dict[str, tuple[tuple[QuantFormat, ...], KVCacheFormat]],
                    target: str, max_seq_len: int) -> list[tuple[str | None, str]]:
    """(variant or None for the model, problem) for everything the family table does not hold; a variant
    gives the formats its checkpoint may hold (one, or those quant auto mixes)."""
    model_type = source_config.get("model_type", "?")
    family = family_of(source_config)
    if family is None:
        return [(None, f"model_type '{model_type}' is not in kiln's family table ({known_families()}); kiln does "
                       "not guess the TensorRT-LLM fields of a family it has no row for (fix: use a model of a family "
                       "that `kiln families` lists)")]
    problems: list[tuple[str | None, str]] = []
    if target == "trtllm-engine" and family.trtllm is None:
        problems.append((None, f"{family.title} has no TensorRT-LLM checkpoint: {family.no_trtllm_reason} "
                               "(fix: set build.target: trtllm-pytorch to publish the HF checkpoint for "
                               "TensorRT-LLM's PyTorch backend)"))
        return problems
    # LLaMAConfig and QWenConfig have no sliding-window field: an engine would attend over the whole sequence.
    window = source_config.get("sliding_window")
    if (target == "trtllm-engine" and window and source_config.get("use_sliding_window", True)
            and window < max_seq_len):
        problems.append((None, f"{family.title}'s sliding_window {window} is shorter than build.max_seq_len "
                               f"{max_seq_len}, and TensorRT-LLM's engine flow ignores it (fix: set build.max_seq_len "
                               f"to at most {window}, or build.target: trtllm-pytorch)"))
    allowed = family.formats_for(target)
    for name, (formats, kv_cache) in variants.items():
        for quant in formats:
            if quant not in allowed:
                listed = ", ".join(sorted(f.value for f in allowed)) or "none"
                fix = (" (fix: set build.target: trtllm-pytorch, which publishes the HF checkpoint)"
                       if target == "trtllm-engine" and quant in family.pytorch_formats
                       else " (fix: choose one of those formats)")
                problems.append((name, f"{quant.value} is not a format TensorRT-LLM supports for {family.title} with "
                                       f"target {target} (it supports {listed}; source: {family.formats_source}){fix}"))
        if kv_cache not in family.kv_formats:
            listed = ", ".join(sorted(k.value for k in family.kv_formats))
            problems.append((name, f"kv_cache {kv_cache.value} is not supported for {family.title} (use {listed})"))
    return problems
