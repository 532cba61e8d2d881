"""The runtimes table (issue 15.1): a cell for every checkpoint format kiln exports and every runtime,
each naming the runtime version and the evidence; the measured vLLM facts; what recipes and tags do with it."""

from __future__ import annotations

import pytest

from kiln.quantize import (FORMATS, KV_CACHE_FORMATS, KVCacheFormat, Loads, QuantFormat, Runtime, loading_runtimes,
                           runtime_cells)
from kiln.quantize.runtimes import KV_LOADERS, WEIGHT_LOADERS, runtime_problem
from kiln.registry.tags import checkpoint_tags, loading_runtimes_of, runtimes_of


def test_every_exported_format_has_a_cell_for_every_runtime_with_its_evidence():
    missing = [f"{spec.name.value}: quant_algo {spec.export_quant_algo}" for spec in FORMATS.values()
               if set(WEIGHT_LOADERS.get(spec.export_quant_algo, {})) != set(Runtime)]
    missing += [f"kv_cache {spec.name.value}: {spec.export_algo}" for spec in KV_CACHE_FORMATS.values()
                if spec.export_algo and set(KV_LOADERS.get(spec.export_algo, {})) != set(Runtime)]
    assert not missing, f"the runtimes table lacks rows or cells for {missing}"
    for row in (*WEIGHT_LOADERS.values(), *KV_LOADERS.values()):
        for cell in row.values():
            assert cell.evidence.runtime_version and cell.evidence.source
            assert cell.evidence.how in ("measured", "source")


def test_the_weaker_part_decides_and_every_refusal_names_an_alternative():
    # FP8 weights load in SGLang; an NVFP4 KV cache is not known to: the variant is not promised to SGLang.
    assert runtime_cells(QuantFormat.fp8, KVCacheFormat.nvfp4)[Runtime.sglang].loads is Loads.unchecked
    assert runtime_cells(QuantFormat.fp8, KVCacheFormat.fp8)[Runtime.sglang].loads is Loads.yes
    problem = runtime_problem(Runtime.vllm, QuantFormat.int8_sq, KVCacheFormat.fp8)
    assert problem.startswith("vllm does not load int8_sq with a fp8 KV cache (vLLM 0.32.0")
    loads_fp8_kv = [q.value for q in QuantFormat if Runtime.vllm in loading_runtimes(q, KVCacheFormat.fp8)]
    assert {"fp8", "fp8_pc_pt", "nvfp4"} <= set(loads_fp8_kv)   # the measured and read cells, as of vLLM 0.32
    assert f"fix: choose quant {' or '.join(loads_fp8_kv)} with a fp8 KV cache" in problem
    assert "fix: choose kv_cache none" in runtime_problem(Runtime.sglang, QuantFormat.fp8, KVCacheFormat.nvfp4)
    assert runtime_problem(Runtime.trtllm, QuantFormat.int8_sq, KVCacheFormat.fp8) is None


@pytest.mark.parametrize("quant, loads", [("fp8", ["trtllm", "trtllm-pytorch", "vllm", "sglang"]),
                                          ("int8_sq", ["trtllm"])])
def test_tags_carry_each_cell_and_read_back(quant, loads):
    cells = {r.value: c.describe() for r, c in runtime_cells(QuantFormat(quant)).items()}
    tags = checkpoint_tags(publish_key="k", recipe="r", recipe_digest="d", variant="v", source="s", revision="x",
                           quant=quant, kv_cache="none", algorithm="max", export_quant_algo="", group_size="",
                           metrics={}, tools={}, passed=True, failures=[], runtimes=cells)
    assert runtimes_of(tags) == cells
    assert loading_runtimes_of(tags) == loads
