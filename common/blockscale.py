"""Block-scaled formats in plain torch on the CPU: FP8 in 128 x 128 FP32-scaled blocks (ModelOpt's `fp8_pb_wo`,
DeepSeek-V3's layout), and the MX formats, a power-of-two E8M0 scale per 32 elements of E4M3 (MXFP8) or E2M1
(MXFP4, packed two per byte as NVFP4 is).

The reference runtime decodes the exported weights with these and rounds activations as the serving kernels do.
ModelOpt's MX fake quant is a CUDA extension (`fused_amax_convert`), so the rounding here follows its source
(modelopt/torch/kernels/quantization/gemm/tensor_quant_mx.cu, `compute_scale_e8m0_NV`): the block's scale is
2 ** ceil(log2(amax / max)), max 448 for E4M3 and 6 for E2M1, exact at powers of two, clamped to
[-127, 127]; a block of zeros keeps scale 1.
bench/nvfp4_gpu.py compares it with that kernel on a GPU.
"""

from __future__ import annotations

import torch

from kiln.common import nvfp4

E4M3_MAX = 448.0
FP8_BLOCK = 128        # fp8_pb_wo: weight blocks of 128 x 128; serving quantizes activations in 1 x 128 groups
MX_BLOCK = 32          # MXFP8: one E8M0 scale per 32 elements of a row
E8M0_BIAS = 127


def _to_e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"a row of {x.shape[-1]} does not split into blocks of {block}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


# --- 128 x 128 blocks with FP32 scales ---------------------------------------------------------------------------

def block_scale_grid(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The exported `weight_scale` as [ceil(out / 128), in / 128]. ModelOpt writes [ob, 1, ib, 1] and squeezes a
    one-block layer to a scalar; anything else that has not exactly one scale per block is refused."""
    out, inp = weight.shape
    rows, cols = -(-out // FP8_BLOCK), inp // FP8_BLOCK
    if inp % FP8_BLOCK:
        raise ValueError(f"input width {inp} is not a multiple of the {FP8_BLOCK}-wide block")
    if scale.numel() != rows * cols or scale.dim() not in (0, 2, 4):
        raise ValueError(f"weight_scale {tuple(scale.shape)} is not one scale per {FP8_BLOCK} x {FP8_BLOCK} block of a "
                         f"{out} x {inp} weight (want [{rows}, 1, {cols}, 1])")
    return scale.to(torch.float32).reshape(rows, cols)


def dequantize_fp8_blocks(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 [out, in] codes times each 128 x 128 block's FP32 scale -> float32 [out, in]."""
    grid = block_scale_grid(weight, scale)
    out, inp = weight.shape
    full = grid.repeat_interleave(FP8_BLOCK, 0)[:out].repeat_interleave(FP8_BLOCK, 1)[:, :inp]
    return weight.to(torch.float32) * full


def fake_quant_fp8_groups(x: torch.Tensor, group: int = FP8_BLOCK) -> torch.Tensor:
    """Activations as the block-scaled FP8 GEMMs take them (TensorRT-LLM's FP8_BLOCK_SCALES on Hopper, vLLM's
    block kernels): per token, per group of 128 channels, an FP32 scale amax / 448. (Blackwell's variant rounds
    that scale up to a power of two, as MXFP8 does.)"""
    blocks = _blocks(x.to(torch.float32), group)
    scale = blocks.abs().amax(-1, keepdim=True) / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (_to_e4m3(blocks / scale) * scale).reshape(x.shape).to(x.dtype)


# --- MXFP8: E4M3 elements, E8M0 scales per 32 --------------------------------------------------------------------

def e8m0_exponent(amax: torch.Tensor, element_max: float = E4M3_MAX) -> torch.Tensor:
    """ceil(log2(amax / element_max)) computed exactly from the float32 ratio's bits (torch.log2 rounds just above
    a power of two down to it), clamped to [-127, 127]; 0 for a block of zeros, inf or nan, whose scale is 1."""
    ratio = amax.to(torch.float32) / element_max
    mantissa, exponent = torch.frexp(ratio)            # ratio = mantissa * 2 ** exponent, mantissa in [0.5, 1)
    ceil_log2 = torch.where(mantissa == 0.5, exponent - 1, exponent).to(torch.float32)
    usable = (amax > 0) & torch.isfinite(amax)
    return torch.where(usable, ceil_log2.clamp(-127, 127), torch.zeros_like(ceil_log2))


def _e8m0_descale(values: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    """Element values [out, in] times 2 ** (e - 127) per 32 (uint8 biased exponents [out, in / 32]) -> float32."""
    if scale.dtype != torch.uint8:
        raise ValueError(f"an {name} weight_scale holds E8M0 exponents as uint8, got {scale.dtype}")
    if scale.shape != (*values.shape[:-1], values.shape[-1] // MX_BLOCK) or values.shape[-1] % MX_BLOCK:
        raise ValueError(f"{name} weight_scale {tuple(scale.shape)} is not one exponent per {MX_BLOCK} of a "
                         f"{tuple(values.shape)} weight")
    descale = torch.exp2(scale.to(torch.float32) - E8M0_BIAS).unsqueeze(-1)
    return (_blocks(values.to(torch.float32), MX_BLOCK) * descale).reshape(values.shape)


def dequantize_mxfp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 [out, in] codes times 2 ** (e - 127) per 32 (uint8 biased exponents [out, in / 32]) -> float32."""
    return _e8m0_descale(weight, scale, "MXFP8")


def fake_quant_mxfp8(x: torch.Tensor) -> torch.Tensor:
    """MXFP8 activations, quantized at run time per 32 channels with an E8M0 scale (ModelOpt's NV rule)."""
    blocks = _blocks(x.to(torch.float32), MX_BLOCK)
    unscale = torch.exp2(e8m0_exponent(blocks.abs().amax(-1, keepdim=True)))
    return (_to_e4m3(blocks / unscale) * unscale).reshape(x.shape).to(x.dtype)


# --- MXFP4: E2M1 elements, E8M0 scales per 32 --------------------------------------------------------------------

def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in / 2] (two E2M1 codes a byte, low nibble first) times 2 ** (e - 127) per 32 -> float32."""
    return _e8m0_descale(nvfp4.decode_e2m1(nvfp4.unpack_fp4(packed)), scale, "MXFP4")


def fake_quant_mxfp4(x: torch.Tensor) -> torch.Tensor:
    """MXFP4 per 32 channels: scale 2 ** ceil(log2(amax / 6)) (ModelOpt's NV rule), E2M1 rounded to even."""
    blocks = _blocks(x.to(torch.float32), MX_BLOCK)
    unscale = torch.exp2(e8m0_exponent(blocks.abs().amax(-1, keepdim=True), nvfp4.E2M1_MAX))
    return (nvfp4.round_to_e2m1(blocks / unscale) * unscale).reshape(x.shape).to(x.dtype)
