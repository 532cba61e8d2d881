"""The formats table: the one place that says what each quantization format is.

Recipes validate against these enums, planning checks layer widths with the
block sizes here, the ModelOpt adapter picks configs from here and records the
algorithm from here; the export check (packing), trtllm-build (GEMM plugin) and the
LLM-API options (KV dtype) read their TensorRT-LLM facts from here, and validation
decodes by the export name given here; backend llmcompressor reads its modifiers and
preset scheme from here. Adding a format means adding a row, not a branch in five files:
tests/test_format_table.py names what a new row still lacks, tests/test_runtime_table.py
the runtimes table's row for its export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class QuantFormat(str, Enum):
    fp8 = "fp8"
    fp8_pc_pt = "fp8_pc_pt"
    nvfp4 = "nvfp4"
    int4_awq = "int4_awq"
    int4_gptq = "int4_gptq"
    w4a8_awq = "w4a8_awq"
    int8_sq = "int8_sq"
    int8_wo = "int8_wo"


class KVCacheFormat(str, Enum):
    none = "none"
    fp8 = "fp8"
    int8 = "int8"
    nvfp4 = "nvfp4"


class Backend(str, Enum):
    """What quantizes a variant and in which checkpoint format it ships."""

    modelopt = "modelopt"            # NVIDIA ModelOpt: HF checkpoint + TensorRT-LLM checkpoint
    llmcompressor = "llmcompressor"  # llm-compressor's oneshot: a compressed-tensors HF checkpoint (vLLM, SGLang)


@dataclass(frozen=True)
class LlmCompressorMapping:
    """How llm-compressor makes a format: its modifiers, in order, and the preset scheme they apply."""

    modifiers: tuple[str, ...]      # "smoothquant", "gptq", "awq"
    scheme: str                     # a compressed-tensors preset: W4A16, W4A16_ASYM, W8A8
    group_sizes: tuple[int, ...] = ()  # the preset's group; () for per-channel

    @property
    def export_label(self) -> str:
        """The checkpoint label kiln records and the runtimes table is keyed by."""
        return f"compressed-tensors:{self.scheme}"


@dataclass(frozen=True)
class TrtllmMapping:
    """How TensorRT-LLM takes a format's checkpoint."""

    packing: str | None = None      # "int4": two per byte along the output dim; "fp4": along the input dim
    gemm_plugin: str = "auto"       # trtllm-build --gemm_plugin ("auto": TensorRT-LLM chooses)


@dataclass(frozen=True)
class FormatSpec:
    name: QuantFormat
    summary: str
    modelopt_config: str            # attribute of modelopt.torch.quantization
    algorithm: str                  # what produced the weights, recorded in kiln.json and registry tags
    weight_bits: float              # storage bits per weight, scales included
    activation_bits: int            # 16: activations stay in the model dtype
    group_sizes: tuple[int, ...] = ()  # allowed weight block sizes; () means per-tensor or per-channel
    default_group_size: int | None = None
    # Overrides of the ModelOpt config's "algorithm" entry (GPTQ is an INT4 config run with method gptq).
    algorithm_config: dict = field(default_factory=dict)
    takes_alpha: bool = False       # SmoothQuant's migration strength, set in the recipe
    # ModelOpt's in-memory fake quantization runs on a CPU (NVFP4's needs CUDA; kiln's own CPU path stands in).
    modelopt_fake_quant_on_cpu: bool = True
    # `quant_algo` in ModelOpt's hf_quant_config.json and TensorRT-LLM's config.json (measured on export);
    # validation picks its weight codec by it.
    export_quant_algo: str = ""
    trtllm: TrtllmMapping | None = None
    llmcompressor: LlmCompressorMapping | None = None   # None: backend llmcompressor does not make it

    def export_label(self, backend: "Backend") -> str:
        """What the checkpoint calls its format: ModelOpt's quant_algo, or compressed-tensors' scheme."""
        return self.llmcompressor.export_label if backend is Backend.llmcompressor else self.export_quant_algo


@dataclass(frozen=True)
class KVCacheSpec:
    name: KVCacheFormat
    modelopt_config: str | None     # attribute of modelopt.torch.quantization
    unsupported: str | None = None  # why kiln refuses it, when it does
    export_algo: str | None = None  # `kv_cache_quant_algo` of the exported configs
    runtime_dtype: str = "auto"     # tensorrt_llm KvCacheConfig.dtype ("auto": the model's dtype)


FORMATS: dict[QuantFormat, FormatSpec] = {spec.name: spec for spec in (
    FormatSpec(QuantFormat.fp8, "FP8 E4M3 weights and activations, per-tensor scales",
               "FP8_DEFAULT_CFG", "max", 8, 8, export_quant_algo="FP8", trtllm=TrtllmMapping(gemm_plugin="fp8")),
    FormatSpec(QuantFormat.fp8_pc_pt, "FP8 weights with per-channel scales, activations per token (dynamic)",
               "FP8_PER_CHANNEL_PER_TOKEN_CFG", "max", 8, 8, export_quant_algo="FP8_PER_CHANNEL_PER_TOKEN",
               trtllm=TrtllmMapping()),
    FormatSpec(QuantFormat.nvfp4, "FP4 E2M1 weights and activations, E4M3 scale per 16 elements plus an FP32 global scale",
               "NVFP4_DEFAULT_CFG", "max", 4.5, 4, group_sizes=(16,), default_group_size=16,
               modelopt_fake_quant_on_cpu=False, export_quant_algo="NVFP4",
               trtllm=TrtllmMapping(packing="fp4", gemm_plugin="nvfp4")),
    FormatSpec(QuantFormat.int4_awq, "INT4 weights (W4A16), AWQ, per-group scales",
               "INT4_AWQ_CFG", "awq_lite", 4.25, 16, group_sizes=(64, 128), default_group_size=128,
               export_quant_algo="W4A16_AWQ", trtllm=TrtllmMapping(packing="int4"),
               llmcompressor=LlmCompressorMapping(("awq",), "W4A16_ASYM", (128,))),
    FormatSpec(QuantFormat.int4_gptq, "INT4 weights (W4A16), GPTQ, per-group scales",
               "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "gptq", 4.25, 16, group_sizes=(128,), default_group_size=128,
               algorithm_config={"method": "gptq"},
               export_quant_algo="W4A16_AWQ", trtllm=TrtllmMapping(packing="int4"),   # ModelOpt names it so
               llmcompressor=LlmCompressorMapping(("gptq",), "W4A16", (128,))),
    FormatSpec(QuantFormat.w4a8_awq, "INT4 weights, AWQ, per-group scales; FP8 activations",
               "W4A8_AWQ_BETA_CFG", "awq_lite", 4.25, 8, group_sizes=(128,), default_group_size=128,
               export_quant_algo="W4A8_AWQ", trtllm=TrtllmMapping(packing="int4")),
    FormatSpec(QuantFormat.int8_sq, "INT8 weights (per channel) and activations (per tensor), SmoothQuant",
               "INT8_SMOOTHQUANT_CFG", "smoothquant", 8, 8, algorithm_config={"method": "smoothquant"},
               takes_alpha=True, export_quant_algo="W8A8_SQ_PER_CHANNEL", trtllm=TrtllmMapping(),
               # llm-compressor's W8A8: per-channel weights, activations per token at run time (dynamic)
               llmcompressor=LlmCompressorMapping(("smoothquant", "gptq"), "W8A8")),
    FormatSpec(QuantFormat.int8_wo, "INT8 weights (per channel), W8A16",
               "INT8_WEIGHT_ONLY_CFG", "max", 8, 16, export_quant_algo="W8A16", trtllm=TrtllmMapping()),
)}

KV_CACHE_FORMATS: dict[KVCacheFormat, KVCacheSpec] = {spec.name: spec for spec in (
    KVCacheSpec(KVCacheFormat.none, None),
    KVCacheSpec(KVCacheFormat.fp8, "FP8_KV_CFG", export_algo="FP8", runtime_dtype="fp8"),
    KVCacheSpec(KVCacheFormat.nvfp4, "NVFP4_KV_CFG", export_algo="NVFP4", runtime_dtype="nvfp4"),
    # Measured: ModelOpt 0.47 calibrates an INT8 KV cache but its HF export stops with
    # "Invalid KV cache quantization format", so no checkpoint kiln could validate exists.
    KVCacheSpec(KVCacheFormat.int8, None, unsupported="ModelOpt 0.47 cannot export an INT8 KV cache to the HF "
                "checkpoint (\"Invalid KV cache quantization format\"); use fp8 or nvfp4"),
)}


def format_of_export(quant_algo: str | None) -> FormatSpec | None:
    """The row whose export carries this `quant_algo` (INT4 AWQ and GPTQ share W4A16_AWQ and all it implies)."""
    return next((spec for spec in FORMATS.values() if quant_algo and spec.export_quant_algo == quant_algo), None)


def kv_cache_of_export(kv_cache_quant_algo: str | None) -> KVCacheSpec | None:
    return next((spec for spec in KV_CACHE_FORMATS.values()
                 if kv_cache_quant_algo and spec.export_algo == kv_cache_quant_algo), None)
