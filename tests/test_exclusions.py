"""Variants may keep layers unquantized by name pattern; export, checks and the reference runtime honour it."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from tests.conftest import run_kiln, seed_home, write_recipe


@pytest.mark.slow
def test_excluded_layers_stay_in_the_model_dtype_and_cost_less_accuracy(tmp_path, test_model, kiln_home,
                                                                         spine_cache):
    variants = {
        "int4": {"quant": "int4_awq"},
        "int4-ex": {"quant": "int4_awq", "exclude": ["*.mlp.down_proj", "*.layers.0.*"]},
    }
    seed_home(kiln_home, spine_cache)   # the plain int4 variant is the spine's: only int4-ex calibrates here
    result = run_kiln("build", write_recipe(tmp_path, str(test_model), variants), "--json")
    assert result.returncode == 0, result.stderr
    build = json.loads(result.stdout)
    assert "quantize:int4" not in build["ran"] and "quantize:int4-ex" in build["ran"]
    metrics = {v["variant"]: v["metrics"] for v in build["variants"]}
    assert metrics["int4-ex"]["mean_kl"] < metrics["int4"]["mean_kl"]
    key = next(s["key"] for s in build["stages"] if s["stage"] == "quantize" and s["target"] == "int4-ex")
    entry = kiln_home / "cache" / "quantize" / key
    assert json.loads((entry / "kiln.json").read_text())["exclude"] == ["*.mlp.down_proj", "*.layers.0.*"]
    excluded = json.loads((entry / "hf" / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert "model.layers.2.mlp.down_proj" in excluded
    with safe_open(entry / "hf" / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.2.mlp.down_proj.weight").get_dtype() == "BF16"
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "BF16"
        assert f.get_slice("model.layers.1.self_attn.q_proj.weight").get_dtype() == "U8"
        assert "model.layers.2.mlp.down_proj.weight_scale" not in f.keys()
