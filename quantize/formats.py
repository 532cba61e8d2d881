"""The formats table: the one place that says what each quantization format is.

A format is its row, keyed by its name: `QuantFormat` is that name (a string the table hands out, so
`QuantFormat.fp8`, `QuantFormat("fp8")` and `for quant in QuantFormat` read the table; a registered row is a
format everywhere). Recipes validate against the table; planning checks layer widths with the block sizes
here and picks its memory formula by the row's policy fields (`rewrites_weights`,
`layer_by_layer_under_offload`); `quant: auto` searches the rows that are `auto_searchable`; the ModelOpt
adapter picks configs and records the algorithm from here; the export check (packing), trtllm-build (GEMM
plugin, FP8 context FMHA) and the LLM-API options (KV dtype) read their TensorRT-LLM facts from here; backend
llmcompressor reads its modifiers and preset scheme from here. Three tables read a row by one of its fields:
the GPU table (compile/gpus.py) by `kernel`, the family table (quantize/families.py) by `trtllm.matrix`, and
validation's codecs and the runtimes table by the checkpoint label the export writes (`export_label`): a
runtime's loader decides by what the checkpoint says about itself, and INT4-AWQ and GPTQ share W4A16_AWQ.
A new format is its row (`kiln.quantize.register_format` at run time, which checks the row against those
tables) plus, for a new export label, its codec in validate/codecs.py; tests/test_format_table.py registers a
throw-away row and watches the stages accept it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class _FormatNames(type):
    """The class of format names: `QuantFormat.fp8`, `for quant in QuantFormat` and `name in QuantFormat` read the
    formats table, so a registered row is a format everywhere without touching any class."""

    def __iter__(cls):
        return iter(list(FORMATS))

    def __len__(cls) -> int:
        return len(FORMATS)

    def __contains__(cls, name) -> bool:
        return name in FORMATS

    def __getattr__(cls, name: str) -> "QuantFormat":
        spec = FORMATS.get(name) if not name.startswith("_") else None
        if spec is None:
            raise AttributeError(f"no format '{name}' in the formats table")
        return spec.name


class QuantFormat(str, metaclass=_FormatNames):
    """A format's name: the key of its row in FORMATS. `QuantFormat("fp8")` gives the table's own name object
    (so `is` compares formats) and refuses a name the table lacks, as an Enum would."""

    def __new__(cls, name: str) -> "QuantFormat":
        spec = FORMATS.get(name)
        if spec is None:
            raise ValueError(f"'{name}' is not a format in the formats table")
        return spec.name

    @classmethod
    def _named(cls, name: str) -> "QuantFormat":
        """A new name, for a row being added to the table (the only way names are made)."""
        return str.__new__(cls, name)

    @property
    def value(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"QuantFormat({self.value!r})"

    def __reduce__(self):
        return QuantFormat, (self.value,)


class KVCacheFormat(str, Enum):
    none = "none"
    fp8 = "fp8"
    fp8_cast = "fp8_cast"
    int8 = "int8"
    nvfp4 = "nvfp4"
    nvfp4_cast = "nvfp4_cast"
    nvfp4_rotate = "nvfp4_rotate"


class Kernel(str, Enum):
    """The GEMM a format's checkpoint runs on: the rows of TensorRT-LLM's hardware support matrix (INT8's
    from its engine builder). compile/gpus.py lists the kernels each SM has."""

    fp8 = "fp8"                    # FP8 per tensor
    fp8_rowwise = "fp8_rowwise"    # FP8 weights per channel, activations per token
    nvfp4 = "nvfp4"
    w4a16 = "w4a16"                # INT4 weights (AWQ/GPTQ), 16-bit activations
    w4a8 = "w4a8"                  # INT4 weights, FP8 activations
    w8a8 = "w8a8"                  # INT8 SmoothQuant
    w8a16 = "w8a16"                # INT8 weight-only
    fp8_block = "fp8_block"        # FP8 weights in 128 x 128 blocks, activations in 1 x 128 groups (DeepSeek-V3's)
    mxfp8 = "mxfp8"                # MX FP8: E8M0 scales per 32, Blackwell's block-scaled tensor cores
    fp4_a16 = "fp4_a16"            # FP4 weights dequantized to 16-bit activations (no FP4 tensor core needed)
    mxfp4 = "mxfp4"                # MX FP4 weights and activations: Blackwell's block-scaled FP4 tensor cores
    w4a8_fp4 = "w4a8_fp4"          # FP4 weights (NVFP4 or MXFP4 blocks of 32) times FP8 activations


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

    # The column of TensorRT-LLM's model support matrices (docs/source/reference/precision.md and
    # features/quantization.md) this format is; quantize/families.py lists the columns per family.
    matrix: str
    packing: str | None = None      # "int4": two per byte along the output dim; "fp4": along the input dim
    gemm_plugin: str = "auto"       # trtllm-build --gemm_plugin ("auto": TensorRT-LLM chooses)
    # trtllm-build --use_fp8_context_fmha: the FP8 workflow's context attention, with an FP8 KV cache too.
    fp8_context_fmha: bool = False
    # ModelOpt's TensorRT-LLM checkpoint export makes a checkpoint trtllm-build takes. False: the quantize stage
    # writes hf/ only (the engine flow has no kernels for it, or the export fails; the row says which).
    engine_checkpoint: bool = True


@dataclass(frozen=True)
class ScaleSearch:
    """One of a format's other ways of finding its scales: the ModelOpt config that runs it."""

    modelopt_config: str
    # Whether ModelOpt's TensorRT-LLM export takes the result. Measured on 0.47: static per-block scales (MSE, local
    # Hessian, four over six) fail on the fused q/k/v ("shape '[128, 4]' is invalid"); the HF export is whole, and
    # trtllm-engine builds convert it on the compile host, as for disk-offloaded builds.
    engine_checkpoint: bool = True


@dataclass(frozen=True)
class FormatSpec:
    name: QuantFormat
    summary: str
    kernel: Kernel                  # the GEMM it runs on: which GPUs run it (compile/gpus.py)
    modelopt_config: str            # attribute of modelopt.torch.quantization
    algorithm: str                  # what produced the weights, recorded in kiln.json and registry tags ("none": no
                                    # calibration, every scale is derived from its own block at export and run time)
    weight_bits: float              # storage bits per weight, scales included
    activation_bits: int            # 16: activations stay in the model dtype
    group_sizes: tuple[int, ...] = ()  # allowed weight block sizes; () means per-tensor or per-channel
    default_group_size: int | None = None
    # A recipe's `algorithm:` choices beside `algorithm` (its default), by name. Each exports this row's label
    # (measured), so the codec, the tables and the runtimes are the row's.
    algorithms: dict[str, "ScaleSearch"] = field(default_factory=dict)
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
    # What the stages do differently for it (tests/test_format_table.py checks `algorithm` and
    # `auto_searchable` against ModelOpt's config and auto_quantize):
    # calibration rewrites the weights it quantizes (AWQ's scaled columns, GPTQ's corrections, SmoothQuant's
    # migration): under disk offload the rewritten layers go back to the offload folder (quantize/offload_writeback.py).
    rewrites_weights: bool = False
    # calibration gathers every linear's Hessian in one pass (in_features^2 float32 each: about 5 GB for a 1B
    # Llama): under disk offload it runs a decoder layer at a time on the activations the whole-model pass sees.
    layer_by_layer_under_offload: bool = False
    auto_searchable: bool = True    # ModelOpt's auto_quantize runs its algorithm: `quant: auto` may pick it
    # Every scale comes from the weight itself or from the activations at run time (weights by max or block scales,
    # activations dynamic or 16-bit): no calibration data changes a byte, so the day-0 path (quantize/day0.py)
    # quantizes it tensor by tensor from the source's shards. tests/test_format_table.py checks it against ModelOpt's
    # config (no static input scale).
    calibration_free: bool = False

    def __post_init__(self):
        if not isinstance(self.name, QuantFormat):   # a row names its format with a string; the table owns the name
            object.__setattr__(self, "name", QuantFormat._named(str(self.name)))

    def export_label(self, backend: "Backend") -> str:
        """What the checkpoint calls its format: ModelOpt's quant_algo, or compressed-tensors' scheme."""
        return self.llmcompressor.export_label if backend is Backend.llmcompressor else self.export_quant_algo


@dataclass(frozen=True)
class KVCacheSpec:
    name: KVCacheFormat
    modelopt_config: str | None     # attribute of modelopt.torch.quantization
    unsupported: str | None = None  # why kiln refuses it, when it does
    export_algo: str | None = None  # `kv_cache_quant_algo` of the exported configs
    # tensorrt_llm KvCacheConfig.dtype ("auto": the model's dtype): what the cache holds, so also what the GPU
    # table (compile/gpus.py) and the family table (quantize/families.py) say a GPU or family takes.
    runtime_dtype: str = "auto"
    fp8_context_fmha: bool = False  # an FP8 cache that FP8 context FMHA writes (with an FP8 format)
    # ModelOpt's `constant_amax` for the K/V quantizers: no KV calibration, and the exported k_scale / v_scale
    # are amax / 448 (448: scale 1.0, a plain cast to FP8). The files are an FP8 KV checkpoint like any other.
    constant_amax: float | None = None


# ModelOpt's NVFP4 scale searches that export plain NVFP4 (measured on 0.47). awq_lite and awq_full export NVFP4_AWQ,
# a label no runtime in quantize/runtimes.py loads: not offered. Weight-only NVFP4 runs the same searches with its
# input quantizers off (modelopt_adapter.modelopt_config), and exports W4A16_NVFP4 (measured).
NVFP4_SEARCHES = {"awq_clip": ScaleSearch("NVFP4_AWQ_CLIP_CFG"),
                  "mse": ScaleSearch("NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG", engine_checkpoint=False),
                  "local_hessian": ScaleSearch("NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG", engine_checkpoint=False),
                  "four_over_six": ScaleSearch("NVFP4_FOUR_OVER_SIX_CFG", engine_checkpoint=False)}

# The formats table, keyed by each format's name (a QuantFormat, equal to its string).
FORMATS: dict[QuantFormat, FormatSpec] = {spec.name: spec for spec in (
    FormatSpec("fp8", "FP8 E4M3 weights and activations, per-tensor scales", Kernel.fp8,
               "FP8_DEFAULT_CFG", "max", 8, 8, export_quant_algo="FP8",
               trtllm=TrtllmMapping("FP8", gemm_plugin="fp8", fp8_context_fmha=True)),
    FormatSpec("fp8_pc_pt", "FP8 weights with per-channel scales, activations per token (dynamic)",
               Kernel.fp8_rowwise, "FP8_PER_CHANNEL_PER_TOKEN_CFG", "max", 8, 8,
               export_quant_algo="FP8_PER_CHANNEL_PER_TOKEN", trtllm=TrtllmMapping("FP8 rowwise"),
               calibration_free=True),
    FormatSpec("nvfp4", "FP4 E2M1 weights and activations, E4M3 scale per 16 elements plus an FP32 global scale",
               Kernel.nvfp4, "NVFP4_DEFAULT_CFG", "max", 4.5, 4, group_sizes=(16,), default_group_size=16,
               algorithms=NVFP4_SEARCHES,
               modelopt_fake_quant_on_cpu=False, export_quant_algo="NVFP4",
               trtllm=TrtllmMapping("NVFP4", packing="fp4", gemm_plugin="nvfp4")),
    FormatSpec("int4_awq", "INT4 weights (W4A16), AWQ, per-group scales", Kernel.w4a16,
               "INT4_AWQ_CFG", "awq_lite", 4.25, 16, group_sizes=(64, 128), default_group_size=128,
               export_quant_algo="W4A16_AWQ", trtllm=TrtllmMapping("W4A16 AWQ", packing="int4"),
               llmcompressor=LlmCompressorMapping(("awq",), "W4A16_ASYM", (128,)), rewrites_weights=True),
    FormatSpec("int4_gptq", "INT4 weights (W4A16), GPTQ, per-group scales", Kernel.w4a16,
               "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "gptq", 4.25, 16, group_sizes=(128,), default_group_size=128,
               algorithm_config={"method": "gptq"},
               export_quant_algo="W4A16_AWQ", trtllm=TrtllmMapping("W4A16 GPTQ", packing="int4"),   # ModelOpt names it so
               llmcompressor=LlmCompressorMapping(("gptq",), "W4A16", (128,)),
               rewrites_weights=True, layer_by_layer_under_offload=True, auto_searchable=False),
    FormatSpec("w4a8_awq", "INT4 weights, AWQ, per-group scales; FP8 activations", Kernel.w4a8,
               "W4A8_AWQ_BETA_CFG", "awq_lite", 4.25, 8, group_sizes=(128,), default_group_size=128,
               export_quant_algo="W4A8_AWQ", trtllm=TrtllmMapping("W4A8 AWQ", packing="int4"), rewrites_weights=True),
    FormatSpec("int8_sq", "INT8 weights (per channel) and activations (per tensor), SmoothQuant", Kernel.w8a8,
               "INT8_SMOOTHQUANT_CFG", "smoothquant", 8, 8, algorithm_config={"method": "smoothquant"},
               takes_alpha=True, export_quant_algo="W8A8_SQ_PER_CHANNEL", trtllm=TrtllmMapping("W8A8 SQ"),
               # llm-compressor's W8A8: per-channel weights, activations per token at run time (dynamic)
               llmcompressor=LlmCompressorMapping(("smoothquant", "gptq"), "W8A8"), rewrites_weights=True),
    FormatSpec("int8_wo", "INT8 weights (per channel), W8A16", Kernel.w8a16,
               "INT8_WEIGHT_ONLY_CFG", "max", 8, 16, export_quant_algo="W8A16", trtllm=TrtllmMapping("W8A16"),
               calibration_free=True),
    # The 2026 formats (measured on ModelOpt 0.47, CPU): none has an engine-flow checkpoint. fp8_pb_wo's TensorRT-LLM
    # export asserts on a one-block layer ("Mismatch in expected scale shape"), and TensorRT-LLM's QuantAlgo has no
    # W4A16_NVFP4 or MXFP8, so the HF checkpoint is what ships.
    FormatSpec("fp8_block", "FP8 E4M3 weights with an FP32 scale per 128 x 128 block (DeepSeek-V3's layout); the "
               "block-scaled GEMMs quantize activations per token in groups of 128", Kernel.fp8_block,
               "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", "max", 8, 8, group_sizes=(128,), default_group_size=128,
               export_quant_algo="fp8_pb_wo", trtllm=TrtllmMapping("FP8 block scaling", engine_checkpoint=False),
               calibration_free=True),
    FormatSpec("mxfp8", "MXFP8: FP8 E4M3 weights and activations with a power-of-two (E8M0) scale per 32",
               Kernel.mxfp8, "MXFP8_DEFAULT_CFG", "none", 8.25, 8, group_sizes=(32,), default_group_size=32,
               modelopt_fake_quant_on_cpu=False, export_quant_algo="MXFP8",
               trtllm=TrtllmMapping("MXFP8", engine_checkpoint=False), calibration_free=True),
    FormatSpec("nvfp4_a16", "weight-only NVFP4 (NVFP4A16): FP4 E2M1 weights, E4M3 scale per 16 plus an FP32 global "
               "scale; 16-bit activations, so no FP4 tensor core is needed", Kernel.fp4_a16,
               "W4A16_NVFP4_CFG", "max", 4.5, 16, group_sizes=(16,), default_group_size=16,
               algorithms=NVFP4_SEARCHES, modelopt_fake_quant_on_cpu=False, export_quant_algo="W4A16_NVFP4",
               trtllm=TrtllmMapping("W4A16 NVFP4", packing="fp4", engine_checkpoint=False), calibration_free=True),
    # ModelOpt's TensorRT-LLM export writes these three, but trtllm-build has no GEMM for them (the engine flow's
    # precision matrix has no MX or FP4 x FP8 column): the HF checkpoint ships.
    FormatSpec("mxfp4", "MXFP4 (OCP MX): FP4 E2M1 weights and activations with a power-of-two (E8M0) scale per 32",
               Kernel.mxfp4, "MXFP4_DEFAULT_CFG", "none", 4.25, 4, group_sizes=(32,), default_group_size=32,
               modelopt_fake_quant_on_cpu=False, export_quant_algo="mxfp4",   # ModelOpt writes it in lower case
               trtllm=TrtllmMapping("MXFP4", packing="fp4", engine_checkpoint=False), calibration_free=True),
    FormatSpec("w4a8_nvfp4_fp8", "NVFP4 weights in blocks of 32 (E4M3 scales plus an FP32 global scale); FP8 "
               "activations with a calibrated per-tensor scale", Kernel.w4a8_fp4, "W4A8_NVFP4_FP8_CFG", "max", 4.25, 8,
               group_sizes=(32,), default_group_size=32, modelopt_fake_quant_on_cpu=False,
               export_quant_algo="W4A8_NVFP4_FP8",
               trtllm=TrtllmMapping("W4A8 NVFP4 FP8", packing="fp4", engine_checkpoint=False)),
    FormatSpec("w4a8_mxfp4_fp8", "MXFP4 weights (E8M0 scale per 32); FP8 activations, their per-tensor scale taken "
               "at run time (no calibration)", Kernel.w4a8_fp4, "W4A8_MXFP4_FP8_CFG", "none", 4.25, 8,
               group_sizes=(32,), default_group_size=32, modelopt_fake_quant_on_cpu=False,
               export_quant_algo="W4A8_MXFP4_FP8",
               trtllm=TrtllmMapping("W4A8 MXFP4 FP8", packing="fp4", engine_checkpoint=False), calibration_free=True),
)}

KV_CACHE_FORMATS: dict[KVCacheFormat, KVCacheSpec] = {spec.name: spec for spec in (
    KVCacheSpec(KVCacheFormat.none, None),
    KVCacheSpec(KVCacheFormat.fp8, "FP8_KV_CFG", export_algo="FP8", runtime_dtype="fp8", fp8_context_fmha=True),
    # Measured (ModelOpt 0.47, CPU): with constant_amax 448 the HF export carries k_scale = v_scale = 1.0 and the
    # TensorRT-LLM checkpoint kv_cache_quant_algo FP8 with kv_cache_scaling_factor 1.0. (use_constant_amax, the
    # other spelling, exports no scales at all and drops the KV algorithm from the TensorRT-LLM checkpoint.)
    KVCacheSpec(KVCacheFormat.fp8_cast, "FP8_KV_CFG", export_algo="FP8", runtime_dtype="fp8", fp8_context_fmha=True,
                constant_amax=448.0),
    KVCacheSpec(KVCacheFormat.nvfp4, "NVFP4_KV_CFG", export_algo="NVFP4", runtime_dtype="nvfp4"),
    # Measured: with constant_amax 448 (ModelOpt's use_constant_amax value: the FP8 attention math both KV formats
    # share) the HF export carries k_scale = v_scale = 1.0 and kv_cache_quant_algo NVFP4; the K/V blocks of 16 keep
    # their dynamic E4M3 scales under the global scale 1/6.
    KVCacheSpec(KVCacheFormat.nvfp4_cast, "NVFP4_KV_CFG", export_algo="NVFP4", runtime_dtype="nvfp4",
                constant_amax=448.0),
    # Measured (a CPU Hadamard transform standing in for fast_hadamard_transform, which ModelOpt needs): the export
    # of NVFP4_KV_ROTATE_CFG is a plain NVFP4 KV checkpoint, kv_cache_quant_algo NVFP4, no word of the rotation.
    KVCacheSpec(KVCacheFormat.nvfp4_rotate, None, runtime_dtype="nvfp4", unsupported="ModelOpt 0.47 exports a rotated "
                "NVFP4 KV cache as plain NVFP4 (nothing in hf_quant_config.json or the tensors says K was Hadamard-"
                "rotated), so a runtime would serve unrotated keys while kiln measured rotated ones; use nvfp4 or "
                "nvfp4_cast"),
    # Measured: ModelOpt 0.47 calibrates an INT8 KV cache but its HF export stops with
    # "Invalid KV cache quantization format", so no checkpoint kiln could validate exists.
    KVCacheSpec(KVCacheFormat.int8, None, runtime_dtype="int8", unsupported="ModelOpt 0.47 cannot export an INT8 KV cache to the HF "
                "checkpoint (\"Invalid KV cache quantization format\"); use fp8 or nvfp4"),
)}


# ModelOpt's `quant_algo` for a checkpoint whose layers have more than one format (auto precision): each
# layer's own quant_algo is in `quantized_layers` (hf_quant_config.json, trtllm/quant_cfg.json).
MIXED_PRECISION = "MIXED_PRECISION"
# A recipe's `quant: auto`: ModelOpt's auto_quantize picks each layer's format (quantize/auto_precision.py).
AUTO = "auto"
def kv_calibration_note(kv_cache: KVCacheFormat) -> str | None:
    """What a build and `kiln plan` say of a KV format that takes no calibration; None for one that does."""
    spec = KV_CACHE_FORMATS[kv_cache]
    if spec.constant_amax is None:
        return None
    return (f"KV cache {kv_cache.value}: a constant scale ({spec.constant_amax / 448:g}, amax {spec.constant_amax:g}), "
            "no KV calibration")


def format_of_export(quant_algo: str | None) -> FormatSpec | None:
    """The row whose export carries this `quant_algo` (INT4 AWQ and GPTQ share W4A16_AWQ and all it implies)."""
    return next((spec for spec in FORMATS.values() if quant_algo and spec.export_quant_algo == quant_algo), None)


def kv_cache_of_export(kv_cache_quant_algo: str | None) -> KVCacheSpec | None:
    return next((spec for spec in KV_CACHE_FORMATS.values()
                 if kv_cache_quant_algo and spec.export_algo == kv_cache_quant_algo), None)
