"""The GPU-architecture table: the only place kiln looks up what a GPU can run.

Sources (TensorRT-LLM; cited per cell below):
  [doc]     docs/source/features/quantization.md, "Hardware Support Matrix" (read at commit 09d4c79):
            NVFP4 on Blackwell only; FP8 per tensor on Ada, Hopper, Blackwell; FP8 rowwise on Hopper only;
            W4A8 AWQ/GPTQ on Ada and Hopper; W4A16 AWQ/GPTQ on Ampere, Ada and Hopper, and "." (none)
            for both Blackwell rows, sm100/103 and sm120.
  [builder] the TensorRT engine builder raises RuntimeError for INT8/INT4 weight-only, INT8 KV cache and
            SmoothQuant when 100 <= SM < 120 (design card).
  [modelopt] ModelOpt's fp8_compatible (SM >= 8.9) and fp4_compatible (SM >= 10.0).
  [mx]      MX formats (E8M0 scales per 32) are Blackwell's block-scaled tensor-core MMA (sm100 and sm120); [doc]'s
            note: its sm100/103 FP8 block-scaling GEMMs run the MXFP8 recipe. Elsewhere vLLM only dequantizes MXFP8
            weights (Marlin, sm80+), which is not the format kiln validated (activations stay 16-bit there).
  [w4a16]   weight-only FP4 (NVFP4A16) needs no FP4 tensor core: vLLM 0.32 dequantizes it with Marlin on SM >= 7.5
            (model_executor/layers/quantization/modelopt.py ModelOptNvFp4Config.get_min_capability); kiln lists
            the SMs of this table from sm80.
  [w4a8-fp4] FP4 weights times FP8 activations: TensorRT-LLM's W4A8NVFP4FP8LinearMethod and
            W4A8MXFP4FP8LinearMethod (_torch/modules/linear.py) call Blackwell GEMMs; its fused-MoE capability
            matrix lists both for SM100/103 only (TRTLLMGen, Cutlass), so kiln lists sm100.
The design card's "check" cells for sm120 (INT4 AWQ/GPTQ, W4A8-AWQ, INT8-SQ, INT8 KV) are resolved
as "no": the builder does not forbid them there, but [doc] lists no sm120 kernels for W4A16 or W4A8,
and none of INT8-SQ or INT8 KV for Blackwell. kiln refuses what no source says works.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kiln.quantize import FORMATS, KV_CACHE_FORMATS, Kernel, KVCacheFormat, QuantFormat

K = Kernel


@dataclass(frozen=True)
class GpuArch:
    sm: str
    gpus: tuple[str, ...]
    kernels: frozenset[Kernel]
    kv_dtypes: frozenset[str]           # the KV cache dtypes its attention kernels take (KVCacheSpec.runtime_dtype)
    # trtllm-build --use_fp8_context_fmha: the FP8 workflow's context FMHA kernels exist on Ada and Hopper only.
    fp8_context_fmha: bool = False

    @property
    def formats(self) -> frozenset[QuantFormat]:
        """The formats whose kernel this SM has (read from the formats table each time: rows can be added)."""
        return frozenset(quant for quant, spec in FORMATS.items() if spec.kernel in self.kernels)

    @property
    def kv_caches(self) -> frozenset[KVCacheFormat]:
        """The KV formats whose cache dtype this SM takes (read from the KV table: a new row needs no edit here)."""
        return frozenset(kv for kv, spec in KV_CACHE_FORMATS.items() if spec.runtime_dtype in self.kv_dtypes)

    def describe(self) -> str:
        formats = ", ".join(sorted(f.value for f in self.formats))
        kv = ", ".join(sorted(k.value for k in self.kv_caches))
        return f"{self.sm} runs {formats}; KV cache {kv}"


_AMPERE_KERNELS = frozenset({K.w4a16, K.w8a8, K.w8a16, K.fp4_a16})  # [doc] W4A16 AWQ/GPTQ; [builder] INT8; [w4a16]
_ADA_KERNELS = _AMPERE_KERNELS | {K.fp8, K.w4a8}                # [doc] FP8 per tensor, W4A8; [modelopt] FP8 >= 8.9
# [doc] NVFP4 (Blackwell only); [builder] no INT8/INT4; [mx] MXFP8, MXFP4; [w4a16]
_BLACKWELL_KERNELS = frozenset({K.fp8, K.nvfp4, K.mxfp8, K.mxfp4, K.fp4_a16})
_PRE_BLACKWELL_KV = frozenset({"auto", "fp8", "int8"})   # "auto": the model's own dtype, an unquantized cache
_BLACKWELL_KV = frozenset({"auto", "fp8", "nvfp4"})

ARCHS: dict[str, GpuArch] = {arch.sm: arch for arch in (
    GpuArch("sm80", ("A100", "A30"), _AMPERE_KERNELS, _PRE_BLACKWELL_KV),
    GpuArch("sm86", ("A10", "A40", "RTX 3090", "RTX 3080", "RTX A6000"), _AMPERE_KERNELS, _PRE_BLACKWELL_KV),
    GpuArch("sm89", ("L4", "L40", "L40S", "RTX 4090", "RTX 6000 Ada"), _ADA_KERNELS, _PRE_BLACKWELL_KV,
            fp8_context_fmha=True),
    # FP8 rowwise (per-channel weights, per-token activations) has Hopper kernels only [doc]; FP8 block scaling
    # Hopper and sm100/103, not sm120 [doc].
    GpuArch("sm90", ("H100", "H200", "GH200", "H20"), _ADA_KERNELS | {K.fp8_rowwise, K.fp8_block}, _PRE_BLACKWELL_KV,
            fp8_context_fmha=True),
    # [builder]: no INT8/INT4 weight-only, SmoothQuant or INT8 KV on 100 <= SM < 120; [doc]: no W4A16/W4A8.
    # [w4a8-fp4]: FP4 x FP8 GEMMs (W4A8 NVFP4 FP8, W4A8 MXFP4 FP8) on SM100/103 only.
    GpuArch("sm100", ("B200", "GB200", "B100"), _BLACKWELL_KERNELS | {K.fp8_block, K.w4a8_fp4}, _BLACKWELL_KV),
    GpuArch("sm120", ("RTX 5090", "RTX 5080", "RTX PRO 6000"), _BLACKWELL_KERNELS,
            _BLACKWELL_KV),
)}


def _normalise(name: str) -> str:
    return re.sub(r"[\s_-]+", " ", name.strip().lower())


_BY_NAME = {_normalise(gpu): arch for arch in ARCHS.values() for gpu in (arch.sm, *arch.gpus)}


def known_names() -> str:
    return ", ".join(f"{arch.sm} ({'/'.join(arch.gpus)})" for arch in ARCHS.values())


def resolve_gpu(name: str) -> GpuArch:
    """An SM name (sm90) or a GPU name (H100, 'RTX 5090'), any case."""
    arch = _BY_NAME.get(_normalise(name))
    if arch is None:
        raise ValueError(f"unknown GPU '{name}'; use an SM or GPU name: {known_names()}")
    return arch


def support_problem(quant: QuantFormat, kv_cache: KVCacheFormat, gpu: str) -> str | None:
    """Why `gpu` cannot run this format and KV format, or None when it can."""
    arch = resolve_gpu(gpu)
    label = gpu if _normalise(gpu) == arch.sm else f"{gpu} ({arch.sm})"
    missing = []
    if quant not in arch.formats:
        missing.append(quant.value)
    if kv_cache not in arch.kv_caches:
        missing.append(f"a {kv_cache.value} KV cache")
    if not missing:
        return None
    return f"{label} cannot run {' with '.join(missing)}; {arch.describe()}"
