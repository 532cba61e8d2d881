"""Decoders for the exported checkpoint formats, in plain torch on the CPU.

One codec per `quant_algo` that ModelOpt writes into hf_quant_config.json. A
codec checks a linear layer's stored tensors and returns how to decode them into
float32 weights, plus what the layer does to its input at run time (AWQ's
pre-quant scale, FP8 activation quantization with the exported scale).

Decoding is deferred: the reference runtime keeps the stored bytes (1 byte per
weight for FP8, half that for INT4) and decodes a layer's weight when that layer
runs, so an 8B model validates in about its exported size, not in 4 bytes per weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kiln.common import blockscale, nvfp4

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


Stored = dict[str, torch.Tensor]   # a layer's tensors by short name: weight, weight_scale, input_scale, ...
Transform = Callable[[torch.Tensor, Stored], torch.Tensor]


def _then(*steps: Transform | None) -> Transform | None:
    """Compose input transforms, skipping absent ones."""
    steps = [step for step in steps if step is not None]
    if not steps:
        return None

    def apply(x, stored):
        for step in steps:
            x = step(x, stored)
        return x

    return apply


def _pre_quant(stored: Stored) -> Transform | None:
    """AWQ / SmoothQuant input scaling that could not be folded into the preceding layer."""
    return (lambda x, s: x * s["pre_quant_scale"].to(x.dtype)) if "pre_quant_scale" in stored else None


def _fp8_input(x, s):
    return fake_quant_fp8(x, s["input_scale"])


def _int8_input(x, s):
    return fake_quant_int8(x, s["input_scale"])


@dataclass
class DecodedLinear:
    """A linear layer's stored tensors and how to use them.

    `decode(stored)` gives the float32 [out, in] weight; `input_transform(x, stored)` is what the
    layer does to its input. The tensors travel with the module that holds them (buffers), so the
    functions take them as an argument instead of closing over them.
    """

    stored: Stored
    decode: Callable[[Stored], torch.Tensor]
    input_transform: Transform | None = None
    in_features: int = 0

    @property
    def weight(self) -> torch.Tensor:
        return self.decode(self.stored)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_transform is None else self.input_transform(x, self.stored)


def _layer_tensors(prefix: str, tensors: dict[str, torch.Tensor], *names: str) -> Stored:
    missing = [f"{prefix}.{n}" for n in names if f"{prefix}.{n}" not in tensors]
    if missing:   # a checkpoint whose config names another format than its tensors are
        raise ValueError(f"{prefix}: its format stores {', '.join(names)}; the checkpoint lacks {', '.join(missing)}")
    optional = ("input_scale", "pre_quant_scale")
    return {n: tensors[f"{prefix}.{n}"] for n in (*names, *optional) if n in names or f"{prefix}.{n}" in tensors}


def _check_dtype(prefix: str, weight: torch.Tensor, stored: torch.dtype) -> None:
    if weight.dtype != stored:
        raise ValueError(f"{prefix}.weight: stored as {weight.dtype}, the format stores {stored}")


def _per_channel_weight(s: Stored) -> torch.Tensor:
    # A per-tensor scale broadcasts the same way as a per-channel one.
    return s["weight"].to(torch.float32) * s["weight_scale"].to(torch.float32).reshape(-1, 1)


def _per_channel(prefix: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype, transform=None) -> DecodedLinear:
    stored = _layer_tensors(prefix, tensors, "weight", "weight_scale")
    _check_dtype(prefix, stored["weight"], dtype)
    return DecodedLinear(stored, _per_channel_weight, transform(stored) if transform else None, stored["weight"].shape[1])


def _int4_group_weight(s: Stored) -> torch.Tensor:
    q = unpack_int4(s["weight"]).to(torch.float32)
    return q * s["weight_scale"].to(torch.float32).repeat_interleave(q.shape[1] // s["weight_scale"].shape[1], dim=1)


def _int4_groups(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None, *extra: str) -> Stored:
    stored = _layer_tensors(prefix, tensors, "weight", "weight_scale", *extra)
    _check_dtype(prefix, stored["weight"], torch.uint8)
    group = stored["weight"].shape[1] // stored["weight_scale"].shape[1]  # weight_scale: [out, in / group]
    if group_size and group != group_size:
        raise ValueError(f"{prefix}.weight_scale implies group {group}, hf_quant_config.json says {group_size}")
    return stored


def _decode_fp8(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
    return _per_channel(prefix, tensors, torch.float8_e4m3fn, lambda s: _fp8_input if "input_scale" in s else None)


def _decode_int4_awq(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
    """W4A16 (AWQ, and GPTQ, which ModelOpt exports under the same label without pre-quant scales)."""
    stored = _int4_groups(prefix, tensors, group_size)
    return DecodedLinear(stored, _int4_group_weight, _pre_quant(stored), stored["weight"].shape[1])


def _w4a8_weight(s: Stored) -> torch.Tensor:
    return fake_quant_fp8(_int4_group_weight(s), s["weight_scale_2"])


def _decode_w4a8_awq(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
    """INT4 groups dequantized to FP8 with the per-tensor weight_scale_2, FP8 activations."""
    stored = _int4_groups(prefix, tensors, group_size, "weight_scale_2", "input_scale")
    return DecodedLinear(stored, _w4a8_weight, _then(_pre_quant(stored), _fp8_input), stored["weight"].shape[1])


def _decode_fp8_per_channel_per_token(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
    return _per_channel(prefix, tensors, torch.float8_e4m3fn, lambda s: lambda x, _: fake_quant_fp8_per_token(x))


def _decode_int8_weight_only(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
    return _per_channel(prefix, tensors, torch.int8)


def _decode_int8_smoothquant(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
    tensors[f"{prefix}.input_scale"]  # required: a KeyError names the missing tensor
    return _per_channel(prefix, tensors, torch.int8, lambda s: _then(_pre_quant(s), _int8_input))


def _check_block(prefix: str, group_size: int | None, block: int, name: str) -> None:
    if group_size not in (None, block):
        raise ValueError(f"{prefix}: {name} blocks are {block} wide, hf_quant_config.json says {group_size}")


def _nvfp4_weight(s: Stored) -> torch.Tensor:
    return nvfp4.dequantize_weight(s["weight"], s["weight_scale"], s["weight_scale_2"])


def _nvfp4_input(x, s):
    return nvfp4.fake_quant_activation(x, s["input_scale"])


def _decode_nvfp4(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
    _check_block(prefix, group_size, nvfp4.BLOCK, "NVFP4")
    stored = _layer_tensors(prefix, tensors, "weight", "weight_scale", "weight_scale_2")
    nvfp4.check_weight_layout(stored["weight"], stored["weight_scale"])
    transform = _nvfp4_input if "input_scale" in stored else None
    return DecodedLinear(stored, _nvfp4_weight, transform, stored["weight"].shape[-1] * 2)


def _decode_fp8_blocks(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
    """fp8_pb_wo: FP8 weights with an FP32 scale per 128 x 128 block. The checkpoint stores no activation scale;
    the block-scaled GEMMs that load it quantize activations per token in groups of 128 at run time."""
    stored = _layer_tensors(prefix, tensors, "weight", "weight_scale")
    _check_dtype(prefix, stored["weight"], torch.float8_e4m3fn)
    try:
        blockscale.block_scale_grid(stored["weight"], stored["weight_scale"])
    except ValueError as exc:
        raise ValueError(f"{prefix}: {exc}") from None
    return DecodedLinear(stored, lambda s: blockscale.dequantize_fp8_blocks(s["weight"], s["weight_scale"]),
                         lambda x, _: blockscale.fake_quant_fp8_groups(x), stored["weight"].shape[1])


def _mx_blocks(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None, name: str,
               elements: torch.dtype, dequantize) -> Stored:
    """An MX layer's weight (FP8 codes, or E2M1 codes two a byte) and its uint8 E8M0 exponents per 32, checked."""
    _check_block(prefix, group_size, blockscale.MX_BLOCK, name)
    stored = _layer_tensors(prefix, tensors, "weight", "weight_scale")
    _check_dtype(prefix, stored["weight"], elements)
    try:
        dequantize(stored["weight"][:1], stored["weight_scale"][:1])
    except ValueError as exc:
        raise ValueError(f"{prefix}: {exc}") from None
    return stored


def _decode_mxfp8(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
    """MXFP8: FP8 weights with an E8M0 exponent per 32; activations quantized the same way at run time."""
    stored = _mx_blocks(prefix, tensors, group_size, "MXFP8", torch.float8_e4m3fn, blockscale.dequantize_mxfp8)
    return DecodedLinear(stored, lambda s: blockscale.dequantize_mxfp8(s["weight"], s["weight_scale"]),
                         lambda x, _: blockscale.fake_quant_mxfp8(x), stored["weight"].shape[1])


def _fp8_dynamic_per_tensor(x: torch.Tensor, _: Stored) -> torch.Tensor:
    """FP8 with one scale per call, amax / 448 of the whole input: W4A8_MXFP4_FP8 exports no input_scale and
    TensorRT-LLM's W4A8MXFP4FP8LinearMethod quantizes each GEMM's input so (quantize_e4m3_per_tensor)."""
    scale = x.to(torch.float32).abs().amax() / FP8_E4M3_MAX
    return fake_quant_fp8(x, torch.where(scale > 0, scale, torch.ones_like(scale)))


def _mx_fp4(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None, name: str) -> Stored:
    """MXFP4 weights: E2M1 codes two a byte [out, in/2], uint8 E8M0 exponents [out, in/32]."""
    return _mx_blocks(prefix, tensors, group_size, name, torch.uint8, blockscale.dequantize_mxfp4)


def _mxfp4_weight(s: Stored) -> torch.Tensor:
    return blockscale.dequantize_mxfp4(s["weight"], s["weight_scale"])


def _decode_mxfp4(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
    """MXFP4 (W4A4): weights and, at run time, activations in E2M1 blocks of 32 with E8M0 scales."""
    stored = _mx_fp4(prefix, tensors, group_size, "MXFP4")
    return DecodedLinear(stored, _mxfp4_weight, lambda x, _: blockscale.fake_quant_mxfp4(x),
                         stored["weight"].shape[1] * 2)


def _decode_w4a8_mxfp4_fp8(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
    stored = _mx_fp4(prefix, tensors, group_size, "W4A8_MXFP4_FP8")
    return DecodedLinear(stored, _mxfp4_weight, _fp8_dynamic_per_tensor, stored["weight"].shape[1] * 2)


def _decode_w4a8_nvfp4_fp8(prefix: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> DecodedLinear:
    """NVFP4 weights in blocks of 32 (E4M3 scales under weight_scale_2); FP8 activations with the input_scale."""
    block = 2 * nvfp4.BLOCK
    _check_block(prefix, group_size, block, "W4A8_NVFP4_FP8")
    stored = _layer_tensors(prefix, tensors, "weight", "weight_scale", "weight_scale_2", "input_scale")
    try:
        nvfp4.check_weight_layout(stored["weight"], stored["weight_scale"], block)
    except ValueError as exc:
        raise ValueError(f"{prefix}: {exc}") from None
    return DecodedLinear(stored, lambda s: nvfp4.dequantize_weight(s["weight"], s["weight_scale"], s["weight_scale_2"],
                                                                   block),
                         _fp8_input, stored["weight"].shape[-1] * 2)


def plain_linear(weight: torch.Tensor) -> DecodedLinear:
    """An unquantized layer: the stored 16-bit weight, upcast exactly."""
    return DecodedLinear({"weight": weight}, lambda s: s["weight"].to(torch.float32), None, weight.shape[1])


# Keyed by the `quant_algo` of hf_quant_config.json.
WEIGHT_CODECS: dict[str, Callable[[str, dict, int | None], DecodedLinear]] = {
    "FP8": _decode_fp8,
    "FP8_PER_CHANNEL_PER_TOKEN": _decode_fp8_per_channel_per_token,
    "W4A16_AWQ": _decode_int4_awq,
    "W4A8_AWQ": _decode_w4a8_awq,
    "W8A8_SQ_PER_CHANNEL": _decode_int8_smoothquant,
    "W8A16": _decode_int8_weight_only,
    "NVFP4": _decode_nvfp4,
    "W4A16_NVFP4": _decode_nvfp4,   # NVFP4 weights without an input_scale: activations stay 16-bit
    "fp8_pb_wo": _decode_fp8_blocks,   # ModelOpt writes this label in lower case
    "MXFP8": _decode_mxfp8,
    "mxfp4": _decode_mxfp4,            # lower case, as ModelOpt writes it
    "W4A8_NVFP4_FP8": _decode_w4a8_nvfp4_fp8,
    "W4A8_MXFP4_FP8": _decode_w4a8_mxfp4_fp8,
}


# Keyed by `kv_cache_quant_algo`: how K and V are rounded with k_scale / v_scale.
KV_CODECS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "FP8": fake_quant_fp8,
    "NVFP4": lambda x, scale: nvfp4.fake_quant_activation(x, scale / nvfp4.E2M1_MAX),
}
# NVFP4 K/V: dynamic blocks of 16 under a global scale. ModelOpt exports k_scale / v_scale in the FP8 attention math
# both KV formats share, amax / 448 (measured), and quantizes with the NVFP4 global scale amax / (6 * 448): k_scale / 6.
