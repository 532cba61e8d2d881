"""A KV cache cast to FP8 with a constant scale (issue 38.5): no KV calibration, the constant's scales in both
exports, and every table that takes an FP8 cache takes it, because its files are an FP8 KV checkpoint."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from kiln.compile import ARCHS
from kiln.quantize import FAMILIES, KV_CACHE_FORMATS, KVCacheFormat, Runtime, runtime_cells
from tests.conftest import run_kiln, write_recipe

CAST = KVCacheFormat.fp8_cast
NOTE = "KV cache fp8_cast: a constant scale (1, amax 448), no KV calibration"


def test_every_table_that_takes_an_fp8_cache_takes_the_cast_one():
    """The GPU and family tables read KV support from the row's cache dtype, and the runtimes table from its
    export label: the row is the whole change."""
    assert KV_CACHE_FORMATS[CAST].runtime_dtype == KV_CACHE_FORMATS[KVCacheFormat.fp8].runtime_dtype
    for arch in ARCHS.values():
        assert (CAST in arch.kv_caches) == (KVCacheFormat.fp8 in arch.kv_caches), arch.sm
    for family in FAMILIES.values():
        assert (CAST in family.kv_formats) == (KVCacheFormat.fp8 in family.kv_formats), family.model_type
    cast, calibrated = runtime_cells("fp8", CAST), runtime_cells("fp8", KVCacheFormat.fp8)
    assert {r: c.loads for r, c in cast.items()} == {r: c.loads for r, c in calibrated.items()}
    assert cast[Runtime.vllm].loads.value == "yes"


def test_kiln_plan_says_the_cache_is_not_calibrated(tmp_path, test_model, kiln_home):
    recipe = write_recipe(tmp_path, str(test_model), {"cast": {"quant": "int8_wo", "kv_cache": "fp8_cast"},
                                                      "calibrated": {"quant": "int8_wo", "kv_cache": "fp8"}})
    from kiln.pipeline.plan.cache import StageCache
    from kiln.pipeline.plan.dag import make_plan
    from kiln.pipeline.recipe.loader import load_recipe
    from kiln.pipeline.report.tables import plan_document

    plan = make_plan(load_recipe(recipe), kiln_home, StageCache(kiln_home / "cache"), "sqlite:///unused.db")
    assert plan_document(plan)["notes"] == [f"cast: {NOTE}"]   # what `kiln plan --json` prints under "notes"
    text = run_kiln("plan", recipe)
    assert f"cast: {NOTE}" in text.stdout and "calibrated: KV" not in text.stdout


@pytest.mark.slow
def test_a_cast_kv_variant_builds_without_kv_calibration_and_ships_the_constant_scales(tmp_path, test_model,
                                                                                         kiln_home):
    """About 15 s on the toy: the only test that builds, validates and publishes a cast cache through the CLI (the
    reference runtime's agreement with ModelOpt on it is tests/test_reference_runtime.py's int8_wo case)."""
    recipe = write_recipe(tmp_path, str(test_model), {"cast": {"quant": "int8_wo", "kv_cache": "fp8_cast",
                                                               "gates": {"max_kl": 0.05}}},
                          name="cast", samples=8, seq_len=64)
    built = run_kiln("build", recipe, "--json")
    assert built.returncode == 0, built.stderr
    assert f"int8_wo+kv fp8_cast: {NOTE}" in built.stderr
    (variant,) = json.loads(built.stdout)["variants"]
    assert variant["gate"]["passed"] and 0 < variant["metrics"]["mean_kl"] < 0.05
    (entry,) = (kiln_home / "cache" / "quantize").iterdir()
    record = json.loads((entry / "kiln.json").read_text())
    assert (record["quant"], record["kv_cache"]) == ("int8_wo", "fp8_cast")
    hf = json.loads((entry / "hf" / "hf_quant_config.json").read_text())["quantization"]
    assert hf["kv_cache_quant_algo"] == "FP8"
    scales = {k: float(v) for k, v in load_file(entry / "hf" / "model.safetensors").items()
              if k.endswith(("k_scale", "v_scale"))}
    assert len(scales) == 2 * 4 and set(scales.values()) == {1.0}
    trtllm = json.loads((entry / "trtllm" / "config.json").read_text())["quantization"]
    assert trtllm["kv_cache_quant_algo"] == "FP8"
    factors = {k: v for k, v in load_file(entry / "trtllm" / "rank0.safetensors").items()
               if k.endswith("kv_cache_scaling_factor")}
    assert len(factors) == 4 and all(float(v) == 1.0 for v in factors.values())
