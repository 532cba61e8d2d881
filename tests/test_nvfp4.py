"""NVFP4 on the CPU: the decoder on hand-built blocks, activation rounding, and ModelOpt's own export."""

from __future__ import annotations

import pytest
import torch

from kiln.common import nvfp4


def _pack(codes: list[int]) -> torch.Tensor:
    pairs = torch.tensor(codes, dtype=torch.uint8).view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).view(1, -1)


def test_every_e2m1_code():
    expected = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert nvfp4.decode_e2m1(torch.arange(16)).tolist() == expected


def test_unpack_low_nibble_first():
    assert nvfp4.unpack_fp4(torch.tensor([[0x21, 0xF7]], dtype=torch.uint8)).tolist() == [[1, 2, 7, 15]]


def test_rounding_ties_to_even_saturation_sign_and_zero():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.26, 100.0, -0.74, -5.1, 0.0, -0.0])
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 6.0, -0.5, -6.0, 0.0, -0.0]
    got = nvfp4.round_to_e2m1(x)
    assert got.tolist() == want
    assert torch.signbit(got[-1])  # negative zero keeps its sign, as E2M1 code 8 does


def test_dequantize_weight_with_scale_edge_cases():
    codes = list(range(16)) * 2  # one row of 32 elements: two blocks
    packed = _pack(codes)
    block_scale = torch.tensor([[448.0, 2.0**-9]]).to(torch.float8_e4m3fn)  # E4M3 max and smallest subnormal
    weight = nvfp4.dequantize_weight(packed, block_scale, torch.tensor(0.5))
    values = nvfp4.decode_e2m1(torch.arange(16))
    assert torch.equal(weight[0, :16], values * 448.0 * 0.5)
    assert torch.equal(weight[0, 16:], values * 2.0**-9 * 0.5)
    zero = nvfp4.dequantize_weight(packed, torch.zeros(1, 2).to(torch.float8_e4m3fn), torch.tensor(1.0))
    assert torch.count_nonzero(zero) == 0
    with pytest.raises(ValueError, match="do not cover"):
        nvfp4.dequantize_weight(packed, torch.ones(1, 3).to(torch.float8_e4m3fn), torch.tensor(1.0))


def test_activation_blocks():
    global_scale = torch.tensor(1.0 / 448)  # amax 6 * 448 * global = 6
    block = torch.tensor([6.0, -3.0, 1.0, 0.2] + [0.0] * 12)
    zeros = torch.zeros(16)
    x = torch.stack([torch.cat([block, zeros]), torch.cat([-block, block * 0.001])])
    y = nvfp4.fake_quant_activation(x, global_scale)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y[0, :4].tolist() == pytest.approx([6.0, -3.0, 1.0, 0.0])  # block scale 1: plain E2M1 rounding
    assert torch.count_nonzero(y[0, 16:]) == 0  # an all-zero block stays zero (no division by zero)
    assert torch.equal(y[1, :16], -y[0, :16])
    small = y[1, 16:20] / 0.001
    assert small[0].item() == pytest.approx(6.0, rel=0.07)  # scale stored in E4M3: within its rounding
    with pytest.raises(ValueError, match="divisible by 16"):
        nvfp4.fake_quant_activation(torch.ones(3, 24), global_scale)


@pytest.mark.slow
def test_round_trip_against_modelopts_export(tmp_path, test_model):
    """kiln's decoder gives exactly what ModelOpt's own dequantizer gives for its exported weights."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    from kiln.pipeline.data.corpus import python_docs
    from kiln.pipeline.data.documents import token_samples
    from kiln.quantize import KVCacheFormat, QuantFormat
    from kiln.quantize import modelopt_adapter as adapter

    samples = token_samples(python_docs("train"), AutoTokenizer.from_pretrained(test_model), 8, 128)
    model = adapter.load_source_model(test_model, "bfloat16", False, False)
    adapter.calibrate(model, adapter.modelopt_config(QuantFormat.nvfp4, KVCacheFormat.none, None), samples, lambda n: None)
    adapter.export_hf(model, tmp_path / "hf")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    source = load_file(test_model / "model.safetensors")
    layers = [k[: -len(".weight_scale_2")] for k in exported if k.endswith(".weight_scale_2")]
    assert len(layers) == 4 * 7
    for layer in layers:
        weight, scale, scale_2 = (exported[f"{layer}.{n}"] for n in ("weight", "weight_scale", "weight_scale_2"))
        original = source[f"{layer}.weight"].float()
        assert weight.dtype == torch.uint8 and weight.shape == (original.shape[0], original.shape[1] // 2)
        assert scale.dtype == torch.float8_e4m3fn and scale.shape == (original.shape[0], original.shape[1] // 16)
        mine = nvfp4.dequantize_weight(weight, scale, scale_2)
        theirs = NVFP4QTensor(original.shape, torch.float32, weight).dequantize(
            dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
        assert torch.equal(mine, theirs), layer
        assert ((mine - original).norm() / original.norm()).item() < 0.15, layer


@pytest.mark.slow
def test_nvfp4_variant_builds_and_validates_on_cpu(tmp_path, test_model, kiln_home):
    """The whole stage chain for NVFP4 on a machine without CUDA: calibrate, export, check, validate, publish."""
    import json

    from tests.conftest import run_kiln, write_recipe

    recipe = write_recipe(tmp_path, str(test_model), {"nvfp4": {"quant": "nvfp4", "gates": {"max_kl": 0.05}}})
    result = run_kiln("build", recipe, "--json")
    assert result.returncode == 0, result.stderr
    variant = json.loads(result.stdout)["variants"][0]
    assert 0 < variant["metrics"]["mean_kl"] < 0.05 and variant["registry"]["version"] == "1"
    quant = json.loads(next(kiln_home.rglob("hf/hf_quant_config.json")).read_text())["quantization"]
    assert quant["quant_algo"] == "NVFP4" and quant["group_size"] == 16


def _round_to_e2m1_by_table(x: torch.Tensor) -> torch.Tensor:
    """The table search nvfp4.round_to_e2m1 replaced: the nearest of the eight magnitudes, a midpoint to the even
    code."""
    midpoints = (nvfp4.E2M1_MAGNITUDES[1:] + nvfp4.E2M1_MAGNITUDES[:-1]) / 2
    magnitude = x.abs().clamp(max=nvfp4.E2M1_MAX)
    index = torch.bucketize(magnitude, midpoints)  # a value on a midpoint gets the lower neighbour
    on_midpoint = magnitude == midpoints[index.clamp(max=len(midpoints) - 1)]
    index = index + (on_midpoint & (index % 2 == 1)).to(index.dtype)  # the lower neighbour's code is odd
    return torch.copysign(nvfp4.E2M1_MAGNITUDES[index], x)


def test_e2m1_rounding_by_step_is_the_table_search_it_replaced():
    """Every midpoint (ties to the even code), both signs, saturation, and a million random values."""
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    x = torch.cat([midpoints, -midpoints, torch.tensor([0.0, 6.0, 6.5, -100.0, 1.9999999, 3.9999998]),
                   torch.randn(1_000_000, generator=torch.Generator().manual_seed(0)) * 3])
    assert torch.equal(nvfp4.round_to_e2m1(x), _round_to_e2m1_by_table(x))
    assert nvfp4.round_to_e2m1(midpoints).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
