"""Backend llmcompressor (issue 15.2): compressed-tensors checkpoints, validated through compressed-tensors'
own decompression, built by llm-compressor's oneshot in its own interpreter, published like any variant."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_kiln, write_recipe



def _compress_w4a16(model_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """The test model as a pack-quantized W4A16 checkpoint, written by compressed-tensors itself (no
    llm-compressor: round-to-nearest with min/max scales). Returns each layer's expected dequantized weight."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import load_file, save_file

    scheme = preset_name_to_scheme("W4A16", ["Linear"])
    args = scheme.weights
    tensors, expected = load_file(model_dir / "model.safetensors"), {}
    stored = {}
    for name, weight in tensors.items():
        if ".layers." not in name or not name.endswith("_proj.weight"):
            stored[name] = weight
            continue
        groups = weight.to(torch.float32).reshape(weight.shape[0], -1, args.group_size)
        scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        scale = scale.to(weight.dtype)
        layer = name[: -len(".weight")]
        # in the stored dtype, as compressed-tensors dequantizes (the scale's dtype)
        expected[layer] = fake_quantize(weight, scale, zero_point, args).to(torch.float32)
        packed = PackedQuantizationCompressor.compress({"weight": weight, "weight_scale": scale}, scheme)
        stored.update({f"{layer}.{key}": value for key, value in packed.items()})
    out.mkdir(parents=True)
    save_file(stored, out / "model.safetensors")
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {
        **QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized", ignore=["lm_head"],
                             quantization_status="compressed").model_dump(mode="json"),
        "quant_method": "compressed-tensors"}
    (out / "config.json").write_text(json.dumps(config))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(model_dir / extra, out / extra)
    return expected


def test_the_reference_runtime_decodes_compressed_tensors_with_compressed_tensors(tmp_path, test_model):
    from kiln.validate import load_reference_model
    from kiln.validate.runtime import ReferenceLinear

    expected = _compress_w4a16(test_model, tmp_path / "ct")
    model = load_reference_model(tmp_path / "ct")
    layers = dict(model.named_modules())
    for name, weight in expected.items():
        layer = layers[name]
        assert isinstance(layer, ReferenceLinear) and "weight_packed" in layer._stored_names
        assert layer.stored_weight_packed.dtype == torch.int32          # 8 codes per int32, as stored
        assert torch.equal(layer.weight, weight), name                  # compressed-tensors' own dequantization
    assert isinstance(layers["lm_head"], ReferenceLinear) and "weight_packed" not in layers["lm_head"]._stored_names

    # A damaged scale in the file changes what the runtime computes: the files are what is validated.
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight_scale"] *= 4
    save_file(tensors, tmp_path / "ct" / "model.safetensors")
    damaged = dict(load_reference_model(tmp_path / "ct").named_modules())["model.layers.0.mlp.down_proj"]
    assert torch.allclose(damaged.weight, 4 * expected["model.layers.0.mlp.down_proj"])


def test_without_llm_compressor_the_build_stops_with_the_fix(tmp_path, test_model, kiln_home):
    recipe = write_recipe(tmp_path, str(test_model), variants={
        "w8a8": {"quant": "int8_sq", "backend": "llmcompressor"}}, samples=4, seq_len=32)
    result = run_kiln("build", recipe, env={"KILN_LLMCOMPRESSOR_PYTHON": str(REPO / ".venv" / "bin" / "python")})
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "backend llmcompressor needs llm-compressor" in line and "make llmcompressor-env" in line
    assert "Traceback" not in result.stderr
    assert not list((kiln_home / "cache").glob("quantize/*"))


@pytest.mark.slow
def test_llmcompressor_variants_build_validate_and_publish(tmp_path, test_model, kiln_home, llmcompressor_python):
    variants = {
        "w8a8": {"quant": "int8_sq", "backend": "llmcompressor", "runtimes": ["vllm", "sglang"],
                 "gates": {"max_kl": 0.01, "min_top1_agreement": 0.95}},
        "w4-gptq": {"quant": "int4_gptq", "backend": "llmcompressor", "runtimes": ["vllm"],
                    "gates": {"max_kl": 0.02, "min_top1_agreement": 0.9}},
    }
    recipe = write_recipe(tmp_path, str(test_model), variants=variants, name="lc", samples=16, seq_len=128,
                          publish={"aliases": ["candidate"]})
    env = {"KILN_LLMCOMPRESSOR_PYTHON": str(llmcompressor_python)}
    built = run_kiln("build", recipe, "--json", env=env)
    assert built.returncode == 0, built.stderr
    document = json.loads(built.stdout)
    for variant in document["variants"]:
        assert variant["gate"]["passed"], variant
        assert 0 < variant["metrics"]["mean_kl"] < 0.02

    pulled = tmp_path / "pulled"
    assert run_kiln("pull", "lc-w4-gptq@candidate", "--out", pulled, "--gpu", "none").returncode == 0
    assert not (pulled / "trtllm").exists()
    config = json.loads((pulled / "hf" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 128
    record = json.loads((pulled / "kiln.json").read_text())
    assert record["backend"] == "llmcompressor" and record["export_quant_algo"] == "compressed-tensors:W4A16"
    assert record["tools"]["llmcompressor"] == "0.14.0.1" and record["tools"]["compressed-tensors"] == "0.19.0"

    rows = {r["name"]: r for r in json.loads(run_kiln("ls", "--json").stdout)}
    assert rows["lc-w8a8"]["backend"] == "llmcompressor" and rows["lc-w8a8"]["runtimes"] == ["vllm", "sglang"]
    assert "int8_sq (llmcompressor)" in run_kiln("ls").stdout

    again = json.loads(run_kiln("build", recipe, "--json", env=env).stdout)
    assert again["ran"] == []
    assert {s["status"] for s in again["stages"] if not s["target"].endswith("@vllm")} == {"cached"}
