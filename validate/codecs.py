"""Decoders for the exported checkpoint formats, in plain torch on the CPU.

One codec per `quant_algo` that ModelOpt writes into hf_quant_config.json. A
codec turns a linear layer's stored tensors into float weights plus what the
layer does to its input at run time (AWQ's pre-quant scale, FP8 activation
quantization with the exported scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

FP8_E4M3_MAX = 448.0


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round x to FP8 E4M3 with a per-tensor scale, as the serving kernels do, and back."""
    scale = scale.to(torch.float32)
    q = (x.to(torch.float32) / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.to(torch.float32) * scale).to(x.dtype)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[out/2, in] uint8 -> [out, in] int8 in [-8, 7].

    ModelOpt packs two output rows per byte: row 2j in the low nibble, row
    2j+1 in the high nibble, each a two's-complement 4-bit value.
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed INT4 weight must be uint8, got {packed.dtype}")
    as_int = packed.to(torch.int16)
    low = as_int & 0x0F
    high = (as_int >> 4) & 0x0F
    rows = torch.stack([low, high], dim=1).reshape(packed.shape[0] * 2, packed.shape[1])
    return torch.where(rows >= 8, rows - 16, rows).to(torch.int8)


@dataclass
class DecodedLinear:
    weight: torch.Tensor                      # float32 [out, in]
    input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None


def _decode_fp8(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
    weight = tensors[f"{prefix}.weight"]
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{prefix}.weight: FP8 checkpoint stores {weight.dtype}, expected float8_e4m3fn")
    weight = weight.to(torch.float32) * tensors[f"{prefix}.weight_scale"].to(torch.float32)
    input_scale = tensors.get(f"{prefix}.input_scale")
    transform = (lambda x, s=input_scale: fake_quant_fp8(x, s)) if input_scale is not None else None
    return DecodedLinear(weight, transform)


def _decode_int4_awq(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
    q = unpack_int4(tensors[f"{prefix}.weight"]).to(torch.float32)
    scale = tensors[f"{prefix}.weight_scale"].to(torch.float32)  # [out, in / group]
    group = q.shape[1] // scale.shape[1]
    if group_size and group != group_size:
        raise ValueError(f"{prefix}.weight_scale implies group {group}, hf_quant_config.json says {group_size}")
    weight = q * scale.repeat_interleave(group, dim=1)
    pre_quant = tensors.get(f"{prefix}.pre_quant_scale")
    transform = (lambda x, s=pre_quant: x * s.to(x.dtype)) if pre_quant is not None else None
    return DecodedLinear(weight, transform)


def _decode_nvfp4(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
    from kiln.validate import nvfp4

    if group_size not in (None, nvfp4.BLOCK):
        raise ValueError(f"{prefix}: NVFP4 blocks are {nvfp4.BLOCK} wide, hf_quant_config.json says {group_size}")
    weight = nvfp4.dequantize_weight(
        tensors[f"{prefix}.weight"], tensors[f"{prefix}.weight_scale"], tensors[f"{prefix}.weight_scale_2"]
    )
    input_scale = tensors.get(f"{prefix}.input_scale")
    transform = (lambda x, s=input_scale: nvfp4.fake_quant_activation(x, s)) if input_scale is not None else None
    return DecodedLinear(weight, transform)


# Keyed by the `quant_algo` of hf_quant_config.json.
WEIGHT_CODECS: dict[str, Callable[[str, dict, int | None], DecodedLinear]] = {
    "FP8": _decode_fp8,
    "W4A16_AWQ": _decode_int4_awq,
    "NVFP4": _decode_nvfp4,
}

# Keyed by `kv_cache_quant_algo`: how K and V are rounded with k_scale / v_scale.
KV_CODECS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "FP8": fake_quant_fp8,
}
