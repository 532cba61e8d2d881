"""NVFP4 in plain torch on the CPU: E2M1 values, FP8 E4M3 block scales of 16, an FP32 global scale.

ModelOpt's own NVFP4 fake-quant needs CUDA, so the reference runtime decodes the
exported weights and rounds activations itself, and quant: auto estimates NVFP4's error with the same
rounding: the numerics live here, below both stages. Layout of the HF export: `weight`
uint8 [out, in/2], element 2i in the low nibble and 2i+1 in the high nibble;
`weight_scale` float8_e4m3fn [out, in/16]; `weight_scale_2` and `input_scale`
fp32 scalars (amax / (6 * 448)).
"""

from __future__ import annotations

import torch

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
# Magnitudes of the eight E2M1 codes; bit 3 is the sign.
E2M1_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (0..15, in any integer tensor) -> float32 values."""
    codes = codes.to(torch.int64)
    magnitude = E2M1_MAGNITUDES[codes & 0x7]
    return torch.where((codes & 0x8) != 0, -magnitude, magnitude)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """[..., n/2] uint8 -> [..., n] codes: low nibble first."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed NVFP4 weight must be uint8, got {packed.dtype}")
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value (saturating at 6), ties to the even code, as the hardware does.

    The E2M1 grid is evenly spaced within each binade: steps of 0.5 below 2, 1 below 4, 2 up to 6. Dividing by the
    step and rounding half to even (torch.round) is the grid's own ties-to-even-code, since the even codes are the
    even multiples of each step. A few times faster than a table search, which the scale searches call per
    candidate scale."""
    magnitude = x.abs().clamp(max=E2M1_MAX)
    step = torch.where(magnitude < 2, 0.5, torch.where(magnitude < 4, 1.0, 2.0)).to(magnitude.dtype)
    return torch.copysign(torch.round(magnitude / step) * step, x)



def check_weight_layout(packed: torch.Tensor, block_scale: torch.Tensor, block: int = BLOCK) -> None:
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed NVFP4 weight must be uint8, got {packed.dtype}")
    values = (*packed.shape[:-1], packed.shape[-1] * 2)
    if (*block_scale.shape[:-1], block_scale.shape[-1] * block) != values:
        raise ValueError(f"NVFP4 block scales {tuple(block_scale.shape)} do not cover weights {values} in blocks of {block}")


def dequantize_weight(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                      block: int = BLOCK) -> torch.Tensor:
    """`block`: 16, or 32 for W4A8_NVFP4_FP8's weights."""
    check_weight_layout(packed, block_scale, block)
    values = decode_e2m1(unpack_fp4(packed))
    return values * (block_scale.to(torch.float32).repeat_interleave(block, dim=-1) * global_scale.to(torch.float32))


def fake_quant_activation(x: torch.Tensor, global_scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Dynamic NVFP4: per block of 16 (or `block`), scale = amax/6 stored as E4M3 relative to the global scale."""
    dtype, shape = x.dtype, x.shape
    if shape[-1] % block:
        raise ValueError(f"NVFP4 activations need a last dimension divisible by {block}, got {shape[-1]}")
    blocks = x.to(torch.float32).reshape(-1, shape[-1] // block, block)
    global_scale = global_scale.to(torch.float32)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    block_scale = (block_amax / E2M1_MAX / global_scale).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    scale = block_scale * global_scale
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale > 0, round_to_e2m1(blocks / safe) * scale, torch.zeros_like(blocks))
    return q.reshape(shape).to(dtype)


def fake_quant_static(x: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor | None = None,
                      fp8_max: float = E4M3_MAX) -> torch.Tensor:
    """NVFP4 with calibrated (static) per-block amax, as ModelOpt's scale searches leave the weights (MSE, local
    Hessian, four over six): block scale amax / 6 stored as E4M3 under a per-tensor scale of global_amax / (6 *
    fp8_max); four over six normalises by 256 instead of 448, leaving the E4M3 headroom its 4-or-6 choice uses.
    ModelOpt's kernel for this is Triton (modelopt/torch/kernels/quantization/gemm/fp4_kernel.py); a block whose
    scale is zero becomes zeros, as there."""
    dtype, shape = x.dtype, x.shape
    blocks = x.to(torch.float32).reshape(block_amax.numel(), -1)
    amax = block_amax.to(torch.float32).reshape(-1, 1)
    top = (amax.max() if global_amax is None else global_amax.to(torch.float32)) * (E4M3_MAX / fp8_max) / E2M1_MAX
    scale = amax / E2M1_MAX
    scale = (scale * E4M3_MAX / top).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32) * top / E4M3_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale > 0, round_to_e2m1(blocks / safe) * scale, torch.zeros_like(blocks))
    return q.reshape(shape).to(dtype)
