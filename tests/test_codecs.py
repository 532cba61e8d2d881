"""The reference runtime's decoders, on hand-built tensors."""

from __future__ import annotations

import pytest
import torch

from kiln.common import blockscale
from kiln.validate.codecs import WEIGHT_CODECS, fake_quant_fp8, unpack_int4


def test_unpack_int4_every_code_and_row_order():
    # Row 2j sits in the low nibble, row 2j+1 in the high nibble; codes are two's complement.
    low = torch.arange(16, dtype=torch.uint8)
    high = torch.flip(low, [0])
    packed = (low | (high << 4)).view(1, 16)
    rows = unpack_int4(packed)
    expected_low = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1], dtype=torch.int8)
    assert rows.shape == (2, 16) and rows.dtype == torch.int8
    assert torch.equal(rows[0], expected_low)
    assert torch.equal(rows[1], torch.flip(expected_low, [0]))


def test_int4_awq_dequantizes_with_group_scales_and_pre_quant_scale():
    q = torch.tensor([[1, -2, 3, -4], [7, -8, 0, 5]], dtype=torch.int8)  # [out=2, in=4]
    packed = ((q[0].to(torch.int16) & 0xF) | ((q[1].to(torch.int16) & 0xF) << 4)).to(torch.uint8).view(1, 4)
    scale = torch.tensor([[0.5, 2.0], [1.0, 0.25]])  # group 2
    tensors = {"l.weight": packed, "l.weight_scale": scale, "l.pre_quant_scale": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    decoded = WEIGHT_CODECS["W4A16_AWQ"]("l", tensors, 2)
    assert torch.equal(decoded.weight, torch.tensor([[0.5, -1.0, 6.0, -8.0], [7.0, -8.0, 0.0, 1.25]]))
    x = torch.ones(1, 4)
    assert torch.equal(decoded.transform_input(x), torch.tensor([[1.0, 2.0, 3.0, 4.0]]))


def test_fp8_weights_and_activations():
    weight = torch.tensor([[1.0, -2.0], [0.5, 448.0]]).to(torch.float8_e4m3fn)
    tensors = {"l.weight": weight, "l.weight_scale": torch.tensor(0.5), "l.input_scale": torch.tensor(0.01)}
    decoded = WEIGHT_CODECS["FP8"]("l", tensors, None)
    assert torch.equal(decoded.weight, torch.tensor([[0.5, -1.0], [0.25, 224.0]]))
    # 1.0 / 0.01 = 100 -> E4M3 rounds to 96 (spacing 8 in [64, 128)); 10.0 saturates at 448 * 0.01;
    # -0.0001 / 0.01 = -0.01 is subnormal (spacing 2^-9): -5 * 2^-9.
    out = decoded.transform_input(torch.tensor([1.0, 10.0, -0.0001]))
    assert torch.allclose(out, torch.tensor([0.96, 4.48, -5 * 2**-9 * 0.01]), atol=1e-9)


def test_fp8_fake_quant_keeps_dtype_and_zero():
    x = torch.tensor([0.0, 1.0, -3.3], dtype=torch.bfloat16)
    y = fake_quant_fp8(x, torch.tensor(1.0))
    assert y.dtype == torch.bfloat16 and y[0] == 0 and y[1] == 1.0 and y[2] == -3.25


def test_fp8_block_scales_each_128_block_and_rounds_activations_per_group():
    """fp8_pb_wo: one FP32 scale per 128 x 128 block, read in ModelOpt's [ob, 1, ib, 1] layout; a 200-row weight has a
    partial second block row. Reading the scale grid transposed (a mis-read) gives a different weight."""
    codes = torch.ones(200, 256).to(torch.float8_e4m3fn)
    scale = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 1, 2, 1)
    decoded = WEIGHT_CODECS["fp8_pb_wo"]("l", {"l.weight": codes, "l.weight_scale": scale}, 128)
    weight = decoded.weight
    assert weight.shape == (200, 256) and weight.dtype == torch.float32
    assert (weight[0, 0], weight[0, 128], weight[199, 0], weight[199, 255]) == (1.0, 2.0, 3.0, 4.0)
    misread = WEIGHT_CODECS["fp8_pb_wo"]("l", {"l.weight": codes, "l.weight_scale": scale.reshape(2, 2).T}, 128)
    assert not torch.equal(misread.weight, weight)
    # Activations: each group of 128 has its own scale amax / 448: a large group does not coarsen a small one.
    x = torch.cat([torch.full((128,), 0.001), torch.full((128,), 1000.0)]).reshape(1, 256)
    out = decoded.transform_input(x)
    assert torch.allclose(out[0, :128], x[0, :128], rtol=1e-6) and torch.allclose(out[0, 128:], x[0, 128:], rtol=1e-6)
    with pytest.raises(ValueError, match="one scale per 128 x 128 block"):
        WEIGHT_CODECS["fp8_pb_wo"]("l", {"l.weight": codes, "l.weight_scale": torch.ones(3, 1, 2, 1)}, 128)


def test_mxfp8_decodes_e8m0_exponents_and_matches_modelopt_on_the_cpu():
    """The weight decode is ModelOpt's own MXFP8 dequantize (CPU torch); activations round with the NV E8M0 rule of
    ModelOpt's CUDA kernel, whose scale is exact just above a power of two (where torch.log2 rounds down)."""
    from modelopt.torch.quantization.qtensor import MXFP8QTensor

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=generator) * torch.logspace(-3, 2, 64).reshape(64, 1)
    qtensor, scale = MXFP8QTensor.quantize(weight)
    tensors = {"l.weight": qtensor._quantized_data, "l.weight_scale": scale}
    decoded = WEIGHT_CODECS["MXFP8"]("l", tensors, 32)
    assert torch.equal(decoded.weight, qtensor.dequantize(dtype=torch.float32, scale=scale))
    shifted = WEIGHT_CODECS["MXFP8"]("l", {**tensors, "l.weight_scale": scale + 1}, 32)
    assert torch.equal(shifted.weight, decoded.weight * 2)
    # The same rounding on activations as ModelOpt's MXFP8 quantize of a weight (both ceil(log2(amax / 448))).
    x = torch.randn(4, 128, generator=generator) * 30
    reference, reference_scale = MXFP8QTensor.quantize(x)
    assert torch.equal(decoded.transform_input(x), reference.dequantize(dtype=torch.float32, scale=reference_scale))
    just_above = torch.tensor([448.0 * 2 ** 20 * (1 + 2 ** -23)])
    assert torch.log2(just_above / 448).item() == 20.0 and blockscale.e8m0_exponent(just_above).item() == 21.0
    assert blockscale.e8m0_exponent(torch.tensor([448.0 * 8, 0.0])).tolist() == [3.0, 0.0]
    with pytest.raises(ValueError, match="uint8"):
        WEIGHT_CODECS["MXFP8"]("l", {**tensors, "l.weight_scale": scale.float()}, 32)


def test_weight_only_nvfp4_keeps_activations_16_bit():
    from kiln.common import nvfp4

    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    global_scale = weight.abs().amax() / (nvfp4.E2M1_MAX * nvfp4.E4M3_MAX)
    block = (weight.reshape(32, 4, 16).abs().amax(-1) / nvfp4.E2M1_MAX / global_scale).to(torch.float8_e4m3fn)
    codes = torch.zeros(32, 32, dtype=torch.uint8)
    tensors = {"l.weight": codes, "l.weight_scale": block, "l.weight_scale_2": global_scale}
    decoded = WEIGHT_CODECS["W4A16_NVFP4"]("l", tensors, 16)
    x = torch.randn(3, 64)
    assert decoded.input_transform is None and torch.equal(decoded.transform_input(x), x)
    assert decoded.weight.shape == (32, 64) and not decoded.weight.any()


def test_mxfp4_decodes_modelopts_export_and_rounds_activations_to_even():
    """The weight decode is ModelOpt's own MXFP4 dequantize of what its export writes (MXFP4QTensor, CPU torch); a
    shifted exponent doubles a block. Activations round as ModelOpt's CUDA kernel does: 2 ** ceil(log2(amax / 6)),
    E2M1 midpoints to the even code (the export's weights round midpoints down, which is theirs to keep)."""
    from modelopt.torch.quantization.qtensor.mxfp4_tensor import MXFP4QTensor

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=generator) * torch.logspace(-3, 2, 64).reshape(64, 1)
    qtensor, scale = MXFP4QTensor.quantize(weight, 32)
    scale = scale.reshape(64, 4)
    tensors = {"l.weight": qtensor._quantized_data, "l.weight_scale": scale}
    for label in ("mxfp4", "W4A8_MXFP4_FP8"):
        decoded = WEIGHT_CODECS[label]("l", tensors, 32)
        assert decoded.weight.shape == (64, 128)
        assert torch.equal(decoded.weight, qtensor.dequantize(dtype=torch.float32, scale=scale, block_sizes={-1: 32}))
        shifted = WEIGHT_CODECS[label]("l", {**tensors, "l.weight_scale": scale + 1}, 32)
        assert torch.equal(shifted.weight, decoded.weight * 2)
        with pytest.raises(ValueError, match="blocks are 32 wide"):
            WEIGHT_CODECS[label]("l", tensors, 16)
    x = torch.tensor([[0.75, 1.75, 2.5, 3.5, 5.0, 6.0] + [0.0] * 26])   # midpoints under amax 6: scale 1
    assert blockscale.fake_quant_mxfp4(x)[0, :6].tolist() == [1.0, 2.0, 2.0, 4.0, 4.0, 6.0]
    mxfp4 = WEIGHT_CODECS["mxfp4"]("l", tensors, None)
    assert torch.equal(mxfp4.transform_input(x), blockscale.fake_quant_mxfp4(x))


def test_w4a8_mxfp4_fp8_takes_its_fp8_activation_scale_per_call():
    """No input_scale is exported: each GEMM input gets amax / 448, as TensorRT-LLM's W4A8MXFP4FP8LinearMethod does."""
    from modelopt.torch.quantization.qtensor.mxfp4_tensor import MXFP4QTensor

    qtensor, scale = MXFP4QTensor.quantize(torch.randn(8, 32), 32)
    decoded = WEIGHT_CODECS["W4A8_MXFP4_FP8"]("l", {"l.weight": qtensor._quantized_data, "l.weight_scale": scale.reshape(8, 1)}, 32)
    x = torch.randn(2, 5, 32) * 7
    expected = fake_quant_fp8(x, x.abs().amax() / 448)
    assert torch.equal(decoded.transform_input(x), expected) and not torch.equal(expected, x)
    assert torch.equal(decoded.transform_input(x * 10), fake_quant_fp8(x * 10, (x * 10).abs().amax() / 448))


def test_w4a8_nvfp4_fp8_is_nvfp4_in_blocks_of_32_with_fp8_activations():
    from kiln.common import nvfp4

    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(16, 64, generator=generator)
    global_scale = weight.abs().amax() / nvfp4.E4M3_MAX      # ModelOpt's weight_scale_2 for this format: amax / 448
    block = (weight.reshape(16, 2, 32).abs().amax(-1) / nvfp4.E2M1_MAX / global_scale).to(torch.float8_e4m3fn)
    codes = torch.full((16, 32), 0x21, dtype=torch.uint8)    # every element: low nibble 1 (0.5), high nibble 2 (1.0)
    tensors = {"l.weight": codes, "l.weight_scale": block, "l.weight_scale_2": global_scale,
               "l.input_scale": torch.tensor(0.05)}
    decoded = WEIGHT_CODECS["W4A8_NVFP4_FP8"]("l", tensors, 32)
    per_element = block.float().repeat_interleave(32, -1) * global_scale
    assert torch.equal(decoded.weight[:, 0::2], 0.5 * per_element[:, 0::2])
    assert torch.equal(decoded.weight[:, 1::2], per_element[:, 1::2])
    x = torch.randn(3, 64)
    assert torch.equal(decoded.transform_input(x), fake_quant_fp8(x, torch.tensor(0.05)))
    with pytest.raises(ValueError, match="blocks of 32"):
        WEIGHT_CODECS["W4A8_NVFP4_FP8"]("l", {**tensors, "l.weight_scale": block.repeat_interleave(2, -1)}, None)
    with pytest.raises(ValueError, match="lacks l.input_scale"):
        WEIGHT_CODECS["W4A8_NVFP4_FP8"]("l", {k: v for k, v in tensors.items() if k != "l.input_scale"}, 32)


def test_nvfp4_kv_rounds_under_k_scale_over_six_as_modelopt_quantizes():
    """ModelOpt exports an NVFP4 cache's k_scale as amax / 448 (FP8 attention math) and quantizes K with the NVFP4
    global scale amax / (6 * 448): the codec's blocks must sit under k_scale / 6, not k_scale (measured)."""
    from kiln.common import nvfp4
    from kiln.validate.codecs import KV_CODECS

    k = torch.randn(2, 4, 9, 64, generator=torch.Generator().manual_seed(3)) * 3
    amax = torch.tensor(448.0)     # nvfp4_cast's constant: k_scale 1.0
    modelopt = nvfp4.fake_quant_activation(k, amax / (nvfp4.E2M1_MAX * nvfp4.E4M3_MAX))
    assert torch.equal(KV_CODECS["NVFP4"](k, amax / 448), modelopt)
    assert not torch.equal(nvfp4.fake_quant_activation(k, amax / 448), modelopt)   # what k_scale as-is would give
