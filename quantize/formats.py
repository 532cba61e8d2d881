"""The formats table: the one place that says what each quantization format is.

Recipes validate against these enums, planning checks layer widths with the
block sizes here, the ModelOpt adapter picks configs from here and the
reference runtime picks its decoders from here. Adding a format means adding
a row, not a branch in four files.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class QuantFormat(str, Enum):
    fp8 = "fp8"
    nvfp4 = "nvfp4"
    int4_awq = "int4_awq"


class KVCacheFormat(str, Enum):
    none = "none"
    fp8 = "fp8"


@dataclass(frozen=True)
class FormatSpec:
    name: QuantFormat
    summary: str
    modelopt_config: str            # attribute of modelopt.torch.quantization
    algorithm: str                  # what produced the weights, recorded in kiln.json
    weight_bits: int
    activation_bits: int            # 16: activations stay in the model dtype
    group_sizes: tuple[int, ...] = ()  # allowed weight block sizes; () means per-tensor
    default_group_size: int | None = None


@dataclass(frozen=True)
class KVCacheSpec:
    name: KVCacheFormat
    modelopt_config: str | None     # attribute of modelopt.torch.quantization


FORMATS: dict[QuantFormat, FormatSpec] = {
    QuantFormat.fp8: FormatSpec(
        name=QuantFormat.fp8,
        summary="FP8 E4M3 weights and activations, per-tensor scales",
        modelopt_config="FP8_DEFAULT_CFG",
        algorithm="max",
        weight_bits=8,
        activation_bits=8,
    ),
    QuantFormat.nvfp4: FormatSpec(
        name=QuantFormat.nvfp4,
        summary="FP4 E2M1 weights and activations, E4M3 scale per 16 elements plus an FP32 global scale",
        modelopt_config="NVFP4_DEFAULT_CFG",
        algorithm="max",
        weight_bits=4,
        activation_bits=4,
        group_sizes=(16,),
        default_group_size=16,
    ),
    QuantFormat.int4_awq: FormatSpec(
        name=QuantFormat.int4_awq,
        summary="INT4 weights (W4A16), AWQ, per-group scales",
        modelopt_config="INT4_AWQ_CFG",
        algorithm="awq_lite",
        weight_bits=4,
        activation_bits=16,
        group_sizes=(64, 128),
        default_group_size=128,
    ),
}

KV_CACHE_FORMATS: dict[KVCacheFormat, KVCacheSpec] = {
    KVCacheFormat.none: KVCacheSpec(KVCacheFormat.none, None),
    KVCacheFormat.fp8: KVCacheSpec(KVCacheFormat.fp8, "FP8_KV_CFG"),
}
