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

from kiln.validate import nvfp4

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


INT8_MIN, INT8_MAX = -128.0, 127.0


def fake_quant_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """FP8 with a dynamic scale per token (row), as FP8_PER_CHANNEL_PER_TOKEN serving computes it."""
    scale = x.to(torch.float32).abs().amax(dim=-1, keepdim=True) / FP8_E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return fake_quant_fp8(x, scale)


def fake_quant_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric INT8 with a per-tensor scale (amax / 127), full range [-128, 127], round half to even."""
    scale = scale.to(torch.float32)
    q = torch.round(x.to(torch.float32) / scale).clamp(INT8_MIN, INT8_MAX)
    return (q * scale).to(x.dtype)


def _then(*steps):
    """Compose input transforms, skipping absent ones."""
    steps = [step for step in steps if step is not None]
    if not steps:
        return None

    def apply(x):
        for step in steps:
            x = step(x)
        return x

    return apply


def _pre_quant(prefix: str, tensors: dict[str, torch.Tensor]):
    """AWQ / SmoothQuant input scaling that could not be folded into the preceding layer."""
    scale = tensors.get(f"{prefix}.pre_quant_scale")
    return (lambda x, s=scale: x * s.to(x.dtype)) if scale is not None else None


def _per_channel(prefix: str, tensors: dict[str, torch.Tensor], stored: torch.dtype) -> torch.Tensor:
    weight = tensors[f"{prefix}.weight"]
    if weight.dtype != stored:
        raise ValueError(f"{prefix}.weight: stored as {weight.dtype}, the format stores {stored}")
    scale = tensors[f"{prefix}.weight_scale"].to(torch.float32)
    return weight.to(torch.float32) * scale.reshape(-1, 1)


def _group_scales(prefix: str, q: torch.Tensor, tensors: dict[str, torch.Tensor], group_size: int | None) -> torch.Tensor:
    scale = tensors[f"{prefix}.weight_scale"].to(torch.float32)  # [out, in / group]
    group = q.shape[1] // scale.shape[1]
    if group_size and group != group_size:
        raise ValueError(f"{prefix}.weight_scale implies group {group}, hf_quant_config.json says {group_size}")
    return scale.repeat_interleave(group, dim=1)


@dataclass
class DecodedLinear:
    weight: torch.Tensor                      # float32 [out, in]
    input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None


def _decode_fp8(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
    weight = _per_channel(prefix, tensors, torch.float8_e4m3fn)  # a per-tensor scale broadcasts the same way
    input_scale = tensors.get(f"{prefix}.input_scale")
    transform = (lambda x, s=input_scale: fake_quant_fp8(x, s)) if input_scale is not None else None
    return DecodedLinear(weight, transform)


def _decode_int4_awq(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
    """W4A16 (AWQ, and GPTQ, which ModelOpt exports under the same label without pre-quant scales)."""
    q = unpack_int4(tensors[f"{prefix}.weight"]).to(torch.float32)
    return DecodedLinear(q * _group_scales(prefix, q, tensors, group_size), _pre_quant(prefix, tensors))


def _decode_w4a8_awq(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
    """INT4 groups dequantized to FP8 with the per-tensor weight_scale_2, FP8 activations."""
    q = unpack_int4(tensors[f"{prefix}.weight"]).to(torch.float32)
    weight = fake_quant_fp8(q * _group_scales(prefix, q, tensors, group_size), tensors[f"{prefix}.weight_scale_2"])
    input_scale = tensors[f"{prefix}.input_scale"]
    return DecodedLinear(weight, _then(_pre_quant(prefix, tensors), lambda x, s=input_scale: fake_quant_fp8(x, s)))


def _decode_fp8_per_channel_per_token(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
    return DecodedLinear(_per_channel(prefix, tensors, torch.float8_e4m3fn), fake_quant_fp8_per_token)


def _decode_int8_weight_only(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
    return DecodedLinear(_per_channel(prefix, tensors, torch.int8))


def _decode_int8_smoothquant(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
    input_scale = tensors[f"{prefix}.input_scale"]
    return DecodedLinear(
        _per_channel(prefix, tensors, torch.int8),
        _then(_pre_quant(prefix, tensors), lambda x, s=input_scale: fake_quant_int8(x, s)),
    )


def _decode_nvfp4(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
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
    "FP8_PER_CHANNEL_PER_TOKEN": _decode_fp8_per_channel_per_token,
    "W4A16_AWQ": _decode_int4_awq,
    "W4A8_AWQ": _decode_w4a8_awq,
    "W8A8_SQ_PER_CHANNEL": _decode_int8_smoothquant,
    "W8A16": _decode_int8_weight_only,
    "NVFP4": _decode_nvfp4,
}


# Keyed by `kv_cache_quant_algo`: how K and V are rounded with k_scale / v_scale.
KV_CODECS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "FP8": fake_quant_fp8,
    "NVFP4": nvfp4.fake_quant_activation,  # dynamic blocks of 16 under the exported global k/v scale
}
