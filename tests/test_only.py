"""Partial recipes for mixture-of-experts (issue 38.4): `only:` names the modules that alone are quantized, as
ModelOpt's NVFP4_EXPERTS_ONLY_CFG and NVFP4_MLP_ONLY_CFG do for MoE releases; the rest stays 16-bit."""

from __future__ import annotations

import json
import struct

import pytest

from kiln.quantize import KVCacheFormat, QuantFormat
from tests.conftest import run_kiln, write_recipe
from tests.test_family_check import _config_only_model
from tests.test_formats_2026 import _check_problems


def _turned_on(entries: list) -> list[str]:
    """The quantizer patterns a ModelOpt config turns on with a weight or input format."""
    return sorted(e["quantizer_name"] for e in entries if isinstance(e, dict) and "cfg" in e
                  and e.get("enable", True) and e["quantizer_name"].endswith(("weight_quantizer", "input_quantizer")))


def test_only_narrows_the_format_as_modelopts_experts_only_config_does():
    import modelopt.torch.quantization as mtq

    from kiln.quantize.modelopt_adapter import modelopt_config

    config = modelopt_config(QuantFormat.nvfp4, KVCacheFormat.none, None, only=("*.experts",))
    assert _turned_on(config["quant_cfg"]) == ["*.experts.*input_quantizer", "*.experts.*weight_quantizer"]
    assert set(_turned_on(config["quant_cfg"])) <= set(_turned_on(mtq.NVFP4_EXPERTS_ONLY_CFG["quant_cfg"]))
    # The format's own refusals still follow (the router stays 16-bit), and exclude still applies last.
    both = modelopt_config(QuantFormat.nvfp4, KVCacheFormat.none, None, exclude=("*.layers.0.*",), only=("*.mlp",))
    names = [e.get("quantizer_name") for e in both["quant_cfg"]]
    assert names.index("*.mlp.*weight_quantizer") < names.index("*mlp.gate.*") < names.index("*.layers.0.*.*")


@pytest.mark.parametrize("variant, says", [
    ({"quant": "auto", "auto": {"formats": ["nvfp4", "fp8"], "effective_bits": 6}, "only": ["*.experts"]},
     "only does not apply to quant auto"),
    ({"quant": "int4_gptq", "backend": "llmcompressor", "only": ["*.mlp"]}, "only applies to backend modelopt"),
    ({"quant": "nvfp4", "only": ["*.experts"]}, "variants.v.only: '*.experts' matches no module of the model"),
])
def test_only_is_refused_where_it_cannot_apply(tmp_path, variant, says):
    model = _config_only_model(tmp_path / "m", "llama")
    recipe = write_recipe(tmp_path, str(model), {"v": variant}, build={"target": "trtllm-pytorch"})
    (line,) = _check_problems(recipe, model)
    assert says in line and "fix" in line or says in line and "remove it" in line, line


def _header(path) -> dict:
    with open(path, "rb") as f:
        return json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))


@pytest.mark.slow
def test_nvfp4_on_the_experts_only_keeps_attention_16_bit_and_the_bits_say_so(tmp_path, kiln_home):
    """About 20 s: the Mixtral test model with NVFP4 on its experts only, built, validated and published."""
    from tests.family_models import family_model

    model = family_model("mixtral")
    recipe = write_recipe(tmp_path, str(model), {"experts": {"quant": "nvfp4", "only": ["*.experts"]}},
                          name="moe", samples=4, seq_len=64, build={"target": "trtllm-pytorch"},
                          calibration={"builtin": "python-docs-train", "samples": 4, "seq_len": 64,
                                       "all_experts": True})
    built = run_kiln("build", recipe, "--json")
    assert built.returncode == 0, built.stderr
    (variant,) = json.loads(built.stdout)["variants"]
    key = next(s["key"] for s in json.loads(built.stdout)["stages"] if s["stage"] == "quantize")
    entry = kiln_home / "cache" / "quantize" / key
    assert json.loads((entry / "kiln.json").read_text())["only"] == ["*.experts"]
    header = {k: v for k, v in _header(entry / "hf" / "model.safetensors").items() if k != "__metadata__"}
    weights = {k: v for k, v in header.items() if k.endswith(".weight") and ".layers." in k and "norm" not in k}
    attention = {k: v for k, v in weights.items() if ".self_attn." in k}
    experts = {k: v for k, v in weights.items() if ".experts." in k}
    assert attention and {v["dtype"] for v in attention.values()} == {"BF16"}
    assert not any(k.startswith(tuple(a[:-len("weight")] for a in attention)) and k.endswith("scale") for k in header)
    assert experts and {v["dtype"] for v in experts.values()} == {"U8"}   # NVFP4 codes, two per byte
    # The measured bits: 16 for every attention weight, NVFP4's 4.5 (E4M3 scale per 16) for every expert weight.
    count = {name: 1 for name in weights}
    for name, info in weights.items():
        rows, cols = info["shape"]
        count[name] = rows * cols * (2 if info["dtype"] == "U8" else 1)
    routers = {k for k in weights if k.endswith(".gate.weight")}
    linear = sum(n for k, n in count.items())
    expected = (sum(count[k] for k in attention) * 16 + sum(count[k] for k in routers) * 16
                + sum(count[k] for k in experts) * 4.5) / linear
    assert variant["size"]["linear_weights"] == linear
    assert variant["size"]["bits_per_weight"] == pytest.approx(expected, abs=0.01)
    assert 4.5 < variant["size"]["bits_per_weight"] < 16
    assert variant["gate"]["passed"]
