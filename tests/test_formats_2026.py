"""The 2026 formats (issue 38): block FP8 (fp8_block), MXFP8 (mxfp8), weight-only NVFP4 (nvfp4_a16), MXFP4 (mxfp4)
and the FP4 x FP8 mixes (w4a8_nvfp4_fp8, w4a8_mxfp4_fp8), and the calibration-free NVFP4 KV cache (nvfp4_cast).

Each is its row in quantize/formats.py plus a codec; the GPU, family and runtimes tables read the row. Here: what
those tables say of each (and where it comes from), `kiln check` refusing what a GPU, a runtime or a family cannot
take, and one build that validates, publishes and pulls each on the test model. Their codecs are
tests/test_codecs.py's; the reference runtime's agreement with ModelOpt, tests/test_reference_runtime.py's.
Also NVFP4's scale searches (`algorithm:`), which export plain NVFP4."""

from __future__ import annotations

import json

import pytest

from kiln.compile import ARCHS
from kiln.quantize import FAMILIES, FORMATS, Loads, QuantFormat, Runtime, runtime_cells
from tests.conftest import run_kiln, write_recipe
from tests.test_family_check import _config_only_model

NEW = ("fp8_block", "mxfp8", "nvfp4_a16", "mxfp4", "w4a8_nvfp4_fp8", "w4a8_mxfp4_fp8")
DENSE = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")

# Which SMs run each, and which runtimes load its HF checkpoint (compile/gpus.py, quantize/runtimes.py).
SMS = {"fp8_block": {"sm90", "sm100"},                       # FP8 block scaling: Hopper, sm100/103
       "mxfp8": {"sm100", "sm120"},                          # MX tensor cores: Blackwell
       "nvfp4_a16": {"sm80", "sm86", "sm89", "sm90", "sm100", "sm120"},   # weight-only: dequantized anywhere
       "mxfp4": {"sm100", "sm120"},
       "w4a8_nvfp4_fp8": {"sm100"}, "w4a8_mxfp4_fp8": {"sm100"}}          # FP4 x FP8 GEMMs: SM100/103
LOADS = {"fp8_block": {Runtime.trtllm_pytorch, Runtime.vllm}, "mxfp8": {Runtime.vllm}, "nvfp4_a16": {Runtime.vllm},
         "mxfp4": set(),   # TensorRT-LLM has no W4A4 MXFP4 and reads no lower-case mxfp4; vLLM 0.32 neither
         "w4a8_nvfp4_fp8": {Runtime.trtllm_pytorch}, "w4a8_mxfp4_fp8": {Runtime.trtllm_pytorch}}


@pytest.mark.parametrize("name", NEW)
def test_the_tables_read_each_row(name):
    quant = QuantFormat(name)
    spec = FORMATS[quant]
    assert {sm for sm, arch in ARCHS.items() if quant in arch.formats} == SMS[name]
    cells = runtime_cells(quant)
    assert {r for r, cell in cells.items() if cell.loads is Loads.yes} == LOADS[name]
    assert all(cell.evidence.source for cell in cells.values())
    # No engine-flow checkpoint: the quantize stage writes hf/ only, and trtllm-engine takes none of them.
    assert not spec.trtllm.engine_checkpoint and cells[Runtime.trtllm].loads is Loads.no
    for family in FAMILIES.values():
        assert quant not in family.engine_formats
        assert (quant in family.pytorch_formats) == (family.model_type in DENSE), family.model_type


CHECKS = [
    # (model_type, variant, build, what the one line says)
    ("llama", {"quant": "fp8_block", "gpus": ["L40S"]}, {"target": "trtllm-pytorch"},
     "L40S (sm89) cannot run fp8_block"),
    ("llama", {"quant": "mxfp8", "runtimes": ["trtllm-pytorch"]}, {"target": "trtllm-pytorch"},
     "trtllm-pytorch does not load mxfp8 (TensorRT-LLM main (read 2026-12-06), source"),
    ("llama", {"quant": "nvfp4_a16"}, None,
     "nvfp4_a16 is not a format TensorRT-LLM supports for Llama 2, 3.x with target trtllm-engine"),
    ("mixtral", {"quant": "fp8_block"}, {"target": "trtllm-pytorch"},
     "fp8_block is not a format TensorRT-LLM supports for Mixtral (MoE) with target trtllm-pytorch"),
    ("llama", {"quant": "nvfp4_a16", "gpus": ["A100"]}, {"target": "trtllm-pytorch"},
     "variants.v.gpus: target trtllm-pytorch builds TensorRT-LLM artifacts per GPU, and trtllm-pytorch does not "
     "load nvfp4_a16"),
    ("llama", {"quant": "mxfp8", "group_size": 16}, {"target": "trtllm-pytorch"},
     "group_size 16 is not supported by mxfp8; use 32"),
    ("llama", {"quant": "w4a8_nvfp4_fp8", "gpus": ["H100"]}, {"target": "trtllm-pytorch"},
     "H100 (sm90) cannot run w4a8_nvfp4_fp8"),
    ("llama", {"quant": "mxfp4", "runtimes": ["vllm"]}, {"target": "trtllm-pytorch"},
     "vllm does not load mxfp4 (vLLM 0.32.0, source"),
    ("llama", {"quant": "w4a8_mxfp4_fp8", "runtimes": ["vllm"]}, {"target": "trtllm-pytorch"},
     "vllm does not load w4a8_mxfp4_fp8"),
    ("llama", {"quant": "fp8", "kv_cache": "nvfp4_rotate"}, {"target": "trtllm-pytorch"},
     "exports a rotated NVFP4 KV cache as plain NVFP4"),
    ("mixtral", {"quant": "w4a8_nvfp4_fp8"}, {"target": "trtllm-pytorch"},
     "w4a8_nvfp4_fp8 is not a format TensorRT-LLM supports for Mixtral (MoE) with target trtllm-pytorch"),
]


def _check_problems(recipe, model) -> list[str]:
    """What `kiln check` says of a recipe before it reads the data files (the schema's lines, then the model's)."""
    from kiln.common.errors import RecipeErrors
    from kiln.pipeline.plan.checks import model_problems
    from kiln.pipeline.recipe.loader import load_recipe

    try:
        loaded = load_recipe(recipe)
    except RecipeErrors as exc:
        return exc.problems
    return model_problems(loaded, model)


def test_kiln_check_refuses_what_a_gpu_a_runtime_or_a_family_cannot_take(tmp_path):
    """In process: a `kiln check` that gets past the schema builds the builtin corpus (5 s) before it prints, and
    tests/test_family_check.py already proves these lines reach stderr as one line each, exit 2."""
    for i, (model_type, variant, build, says) in enumerate(CHECKS):
        model = _config_only_model(tmp_path / f"m{i}", model_type, num_local_experts=4, num_experts_per_tok=2)
        recipe = write_recipe(tmp_path, str(model), {"v": variant}, name=f"r{i}", **({"build": build} if build else {}))
        (line,) = _check_problems(recipe, model)
        assert line.startswith(str(recipe)) and says in line, line
        assert "fix: " in line or "; use " in line, line   # every refusal says what to do instead
    family_line, = _check_problems(tmp_path / "r2.yaml", tmp_path / "m2")
    assert "fix: set build.target: trtllm-pytorch" in family_line


def test_what_each_row_runs_on_passes_the_same_checks(tmp_path):
    """The accepted side of the refusals above."""
    model = _config_only_model(tmp_path / "ok", "llama")
    recipe = write_recipe(tmp_path, str(model), {"block": {"quant": "fp8_block", "gpus": ["H100", "B200"],
                                                           "runtimes": ["vllm", "trtllm-pytorch"]},
                                                 "mx": {"quant": "mxfp8", "runtimes": ["vllm"]},
                                                 "a16": {"quant": "nvfp4_a16", "runtimes": ["vllm"]},
                                                 "w4a8": {"quant": "w4a8_nvfp4_fp8", "kv_cache": "nvfp4_cast",
                                                          "gpus": ["B200"], "runtimes": ["trtllm-pytorch"]},
                                                 "mx4": {"quant": "w4a8_mxfp4_fp8", "gpus": ["GB200"]}},
                          name="ok", build={"target": "trtllm-pytorch"})
    assert _check_problems(recipe, model) == []


def test_each_scale_search_is_a_modelopt_config_of_the_rows_format():
    """An `algorithm:` must quantize the weights as its row says (the export label, the codec and every table are the
    row's): NVFP4's searches are E2M1 in blocks of 16 with E4M3 scales, like NVFP4_DEFAULT_CFG."""
    import modelopt.torch.quantization as mtq

    def weight_format(config_name):
        (entry,) = [e for e in getattr(mtq, config_name)["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer"]
        blocks = entry["cfg"]["block_sizes"]
        return entry["cfg"]["num_bits"], blocks[-1], blocks["scale_bits"]

    for quant, spec in FORMATS.items():
        for name, search in spec.algorithms.items():
            assert name != spec.algorithm
            assert weight_format(search.modelopt_config) == weight_format(spec.modelopt_config), (quant, name)
    assert set(FORMATS[QuantFormat("nvfp4")].algorithms) == {"awq_clip", "mse", "local_hessian", "four_over_six"}
    assert FORMATS[QuantFormat("nvfp4_a16")].algorithms == FORMATS[QuantFormat("nvfp4")].algorithms


def test_a_weight_only_rows_search_quantizes_no_activation():
    """nvfp4_a16 runs NVFP4's W4A4 search configs with their input quantizers off: ModelOpt then exports
    W4A16_NVFP4 (measured for all four), so the row's codec, GPUs and runtimes hold."""
    from kiln.quantize import modelopt_adapter as adapter
    from kiln.quantize.formats import KVCacheFormat

    for name in FORMATS[QuantFormat("nvfp4_a16")].algorithms:
        entries = adapter.modelopt_config(QuantFormat("nvfp4_a16"), KVCacheFormat.fp8, None, algorithm=name)["quant_cfg"]
        last_input = [e for e in entries if e.get("quantizer_name") == "*input_quantizer"][-1]
        assert last_input == {"quantizer_name": "*input_quantizer", "enable": False}, name
        assert any(e.get("quantizer_name", "").endswith("bmm_quantizer") and e.get("enable", True) for e in entries)
    w4a4 = adapter.modelopt_config(QuantFormat("nvfp4"), KVCacheFormat.none, None, algorithm="mse")["quant_cfg"]
    assert [e for e in w4a4 if e.get("quantizer_name") == "*input_quantizer"][-1].get("enable", True)


@pytest.mark.parametrize("variant, says", [
    ({"quant": "nvfp4", "algorithm": "awq_lite"}, "algorithm awq_lite is not one nvfp4 has (choose max or awq_clip or "
                                                  "mse or local_hessian or four_over_six)"),
    ({"quant": "fp8", "algorithm": "mse"}, "algorithm mse is not one fp8 has (fp8 offers only max; remove it)"),
    ({"quant": "auto", "auto": {"formats": ["nvfp4", "fp8"], "effective_bits": 6}, "algorithm": "mse"},
     "algorithm does not apply to quant auto"),
])
def test_an_algorithm_a_format_does_not_have_is_refused(tmp_path, variant, says):
    model = _config_only_model(tmp_path / "m", "llama")
    recipe = write_recipe(tmp_path, str(model), {"v": variant}, build={"target": "trtllm-pytorch"})
    (line,) = _check_problems(recipe, model)
    assert says in line, line


def test_naming_the_default_algorithm_is_the_default_checkpoint(tmp_path):
    from kiln.pipeline.plan.requests import quantize_key_config, quantize_request
    from kiln.pipeline.recipe.loader import load_recipe

    model = _config_only_model(tmp_path / "m", "llama")
    recipe = load_recipe(write_recipe(tmp_path, str(model), {"a": {"quant": "nvfp4"},
                                                             "b": {"quant": "nvfp4", "algorithm": "max"},
                                                             "c": {"quant": "nvfp4", "algorithm": "mse"}}))
    keys = {name: quantize_key_config(quantize_request(recipe, variant)) for name, variant in recipe.recipe.variants.items()}
    assert keys["a"] == keys["b"] and "algorithm" not in keys["a"] and keys["c"]["algorithm"] == "mse"


@pytest.mark.slow
def test_each_new_row_builds_validates_publishes_and_pulls(tmp_path, test_model, kiln_home):
    """About 30 s: the only test that takes the 2026 rows (and a scale search, whose static blocks ModelOpt's
    TensorRT-LLM export refuses: hf/ only; four_over_six, the cheapest of them to calibrate) through the CLI, export
    to pull."""
    variants = {"block": {"quant": "fp8_block", "runtimes": ["vllm", "trtllm-pytorch"], "gates": {"max_kl": 0.02}},
                "mx": {"quant": "mxfp8", "runtimes": ["vllm"], "gates": {"max_kl": 0.02}},
                "a16": {"quant": "nvfp4_a16", "runtimes": ["vllm"], "gates": {"max_kl": 0.02}},
                "fos": {"quant": "nvfp4", "algorithm": "four_over_six", "gates": {"max_kl": 0.05}},
                "mx4": {"quant": "mxfp4", "runtimes": [], "gates": {"max_kl": 0.05}},
                "w4nv": {"quant": "w4a8_nvfp4_fp8", "kv_cache": "nvfp4_cast", "runtimes": ["trtllm-pytorch"],
                         "gates": {"max_kl": 0.05}},
                "w4mx": {"quant": "w4a8_mxfp4_fp8", "runtimes": ["trtllm-pytorch"], "gates": {"max_kl": 0.05}}}
    recipe = write_recipe(tmp_path, str(test_model), variants, name="f26", samples=8, seq_len=64,
                          build={"target": "trtllm-pytorch"})
    built = run_kiln("build", recipe, "--json")
    assert built.returncode == 0, built.stderr
    report = {v["variant"]: v for v in json.loads(built.stdout)["variants"]}
    expected = {"block": ("fp8_block", "fp8_pb_wo", "max"), "mx": ("mxfp8", "MXFP8", "none"),
                "a16": ("nvfp4_a16", "W4A16_NVFP4", "max"), "fos": ("nvfp4", "NVFP4", "four_over_six"),
                "mx4": ("mxfp4", "mxfp4", "none"), "w4nv": ("w4a8_nvfp4_fp8", "W4A8_NVFP4_FP8", "max"),
                "w4mx": ("w4a8_mxfp4_fp8", "W4A8_MXFP4_FP8", "none")}
    for name, (quant, label, algorithm) in expected.items():
        assert report[name]["gate"]["passed"] and 0 < report[name]["metrics"]["mean_kl"] < 0.05, report[name]
        out = tmp_path / f"pulled-{name}"
        pulled = run_kiln("pull", f"f26-{name}/1", "--out", out)
        assert pulled.returncode == 0, pulled.stderr
        record = json.loads((out / "kiln.json").read_text())
        assert (record["quant"], record["export_quant_algo"], record["algorithm"]) == (quant, label, algorithm)
        assert not record["trtllm_checkpoint"] and not (out / "trtllm").exists()
        hf = json.loads((out / "hf" / "hf_quant_config.json").read_text())["quantization"]
        assert hf["quant_algo"] == label
    # The calibration-free NVFP4 cache: said in the build log, its constant scales exported (k_scale 1.0: amax 448).
    assert "KV cache nvfp4_cast: a constant scale (1, amax 448), no KV calibration" in built.stderr
    cast = json.loads((tmp_path / "pulled-w4nv" / "hf" / "hf_quant_config.json").read_text())["quantization"]
    assert cast["kv_cache_quant_algo"] == "NVFP4"
