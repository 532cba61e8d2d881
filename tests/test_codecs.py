"""The reference runtime's decoders, on hand-built tensors."""

from __future__ import annotations

import torch

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
