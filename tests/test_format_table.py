"""One row per format (issue 14.5): every fact about a quantization format lives in quantize/formats.py,
and the stages read it from there. A row missing its export name, its TensorRT-LLM mapping or a codec
in validate is named here, before it could fail in a build."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kiln.compile import ARCHS
from kiln.quantize import (FAMILIES, FORMATS, KV_CACHE_FORMATS, KVCacheFormat, QuantFormat, register_format, row_problems,
                           unregister_format)
from kiln.quantize.families import MATRIX_COLUMNS
from kiln.validate.codecs import KV_CODECS, WEIGHT_CODECS


def modelopt_policy_problems(spec) -> list[str]:
    """The row's `algorithm` is what its ModelOpt config runs, and `auto_searchable` what auto_quantize accepts:
    the offload and `quant: auto` policies follow these fields, so they must not drift from ModelOpt."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.model_quant import _AUTO_QUANTIZE_SUPPORTED_ALGORITHMS

    algorithm = spec.algorithm_config or getattr(mtq, spec.modelopt_config).get("algorithm", "max")
    method = algorithm.get("method") if isinstance(algorithm, dict) else algorithm
    problems = []
    if ("none" if method is None else method) != spec.algorithm:   # None: MX formats' dynamic scales, no calibration
        problems.append(f"algorithm is '{spec.algorithm}' but {spec.modelopt_config} runs '{method}'")
    if spec.auto_searchable != (method in _AUTO_QUANTIZE_SUPPORTED_ALGORITHMS):
        problems.append(f"auto_searchable is {spec.auto_searchable} but ModelOpt's auto_quantize "
                        f"{'runs' if method in _AUTO_QUANTIZE_SUPPORTED_ALGORITHMS else 'does not run'} '{method}'")
    return problems


def format_table_problems(formats=FORMATS, kv_caches=KV_CACHE_FORMATS) -> list[str]:
    problems = []
    for quant, spec in formats.items():
        where = f"FORMATS[{quant.value}]"
        problems += [f"{where}: {problem}" for problem in row_problems(spec) + modelopt_policy_problems(spec)]
        if not spec.export_quant_algo:
            problems.append(f"{where}: no export_quant_algo (the quant_algo ModelOpt writes for it)")
        elif spec.export_quant_algo not in WEIGHT_CODECS:
            problems.append(f"{where}: validate has no weight codec for quant_algo {spec.export_quant_algo} "
                            "(add it to validate/codecs.py WEIGHT_CODECS)")
        if spec.trtllm is None:
            problems.append(f"{where}: no TensorRT-LLM mapping (FormatSpec.trtllm: weight packing, GEMM plugin)")
        if not any(quant in arch.formats for arch in ARCHS.values()):
            problems.append(f"{where}: no GPU in compile/gpus.py runs it")
    for kv, spec in kv_caches.items():
        if kv is KVCacheFormat.none or spec.unsupported:
            continue
        if not spec.export_algo:
            problems.append(f"KV_CACHE_FORMATS[{kv.value}]: no export_algo (the kv_cache_quant_algo ModelOpt writes)")
        elif spec.export_algo not in KV_CODECS:
            problems.append(f"KV_CACHE_FORMATS[{kv.value}]: validate has no KV codec for {spec.export_algo}")
    return problems


def test_every_format_row_is_complete():
    assert format_table_problems() == []
    for family in FAMILIES.values():   # the other side of a row's matrix column: the family table's columns
        assert family.engine_columns | family.pytorch_columns <= MATRIX_COLUMNS, family.model_type


def test_a_new_row_without_its_codec_or_mapping_is_named():
    int4_awq = FORMATS[QuantFormat.int4_awq]
    new = dataclasses.replace(int4_awq, export_quant_algo="W4A16_NEW", trtllm=None)
    bare = dataclasses.replace(int4_awq, export_quant_algo="", algorithm="max", auto_searchable=False,
                               trtllm=dataclasses.replace(int4_awq.trtllm, matrix="W4A16 RTN"))
    kv = dataclasses.replace(KV_CACHE_FORMATS[KVCacheFormat.fp8], export_algo="FP6")
    problems = format_table_problems({QuantFormat.int4_awq: new, QuantFormat.int4_gptq: bare}, {KVCacheFormat.fp8: kv})
    assert [p.split(" (")[0] for p in problems] == [
        "FORMATS[int4_awq]: validate has no weight codec for quant_algo W4A16_NEW",
        "FORMATS[int4_awq]: no TensorRT-LLM mapping",
        "FORMATS[int4_gptq]: trtllm.matrix 'W4A16 RTN' is not a column the family table reads",
        "FORMATS[int4_gptq]: algorithm is 'max' but INT4_AWQ_CFG runs 'awq_lite'",
        "FORMATS[int4_gptq]: auto_searchable is False but ModelOpt's auto_quantize runs 'awq_lite'",
        "FORMATS[int4_gptq]: no export_quant_algo",
        "KV_CACHE_FORMATS[fp8]: validate has no KV codec for FP6",
    ]


def test_the_stages_read_their_format_facts_from_the_row(monkeypatch):
    """Change a row and the stages follow it: nothing downstream keeps its own copy of the fact."""
    from kiln.compile.engine import gemm_plugin, trtllm_build_argv
    from kiln.compile.llmapi import kv_cache_dtype
    from kiln.compile.targets import CheckpointQuant
    from kiln.compile.targets import CompileRequest, Target

    def quant(algo, kv=None):
        return CheckpointQuant(quant_algo=algo, kv_cache_quant_algo=kv, tp_size=1)

    request = CompileRequest(Target.trtllm_engine, "sm90", 1, 8, 1024, 2048, 4096)
    assert (gemm_plugin(quant("FP8")), kv_cache_dtype(quant("FP8", "FP8"))) == ("fp8", "fp8")

    fp8, kv_fp8 = FORMATS[QuantFormat.fp8], KV_CACHE_FORMATS[KVCacheFormat.fp8]
    monkeypatch.setitem(FORMATS, QuantFormat.fp8,
                        dataclasses.replace(fp8, trtllm=dataclasses.replace(fp8.trtllm, gemm_plugin="row-plugin")))
    monkeypatch.setitem(KV_CACHE_FORMATS, KVCacheFormat.fp8, dataclasses.replace(kv_fp8, runtime_dtype="row-kv"))
    assert gemm_plugin(quant("FP8")) == "row-plugin"
    assert kv_cache_dtype(quant("FP8", "FP8")) == "row-kv"
    argv = trtllm_build_argv(request, quant("FP8"), Path("ckpt"), Path("out"))
    assert argv[argv.index("--gemm_plugin") + 1] == "row-plugin"
    # A row whose export label changes no longer claims the checkpoints labelled with the old one.
    monkeypatch.setitem(FORMATS, QuantFormat.fp8,
                        dataclasses.replace(FORMATS[QuantFormat.fp8], export_quant_algo="FP8_RENAMED"))
    assert gemm_plugin(quant("FP8")) == "auto" and gemm_plugin(quant("FP8_RENAMED")) == "row-plugin"


# A format that is its row: INT4 weights rounded to nearest, ModelOpt's INT4 block config with its default
# max calibration (no AWQ search, no GPTQ). Its checkpoint is a W4A16_AWQ one, so its codec, its runtimes row
# and its GPU kernel already exist: registering the row is the whole change.
def _rtn_row():
    return dataclasses.replace(
        FORMATS[QuantFormat.int4_gptq], name="int4_rtn_test", summary="INT4 weights rounded to nearest (test row)",
        algorithm="max", algorithm_config={}, llmcompressor=None,
        rewrites_weights=False, layer_by_layer_under_offload=False, auto_searchable=True,
        trtllm=dataclasses.replace(FORMATS[QuantFormat.int4_gptq].trtllm, matrix="W4A16 AWQ"))


@pytest.fixture()
def rtn_format():
    quant = register_format(_rtn_row())
    try:
        yield quant
    finally:
        unregister_format(quant)
    assert "int4_rtn_test" not in QuantFormat and not hasattr(QuantFormat, "int4_rtn_test")


def test_a_registered_row_is_in_every_table(rtn_format):
    from kiln.pipeline.cli.families_doc import family_document
    from kiln.quantize import FAMILIES, runtime_cells

    assert QuantFormat("int4_rtn_test") is rtn_format and format_table_problems() == []
    assert [arch.sm for arch in ARCHS.values() if rtn_format in arch.formats] == ["sm80", "sm86", "sm89", "sm90"]
    assert "int4_rtn_test" in family_document(FAMILIES["llama"])["formats"]["trtllm-engine"]
    # A family takes it where its source lists the row's matrix column: Mistral's W4A16 AWQ, not Mixtral.
    assert rtn_format in FAMILIES["mistral"].formats_for("trtllm-pytorch")
    assert rtn_format not in FAMILIES["mixtral"].formats_for("trtllm-pytorch")
    assert {r: c.loads for r, c in runtime_cells(rtn_format).items()} == \
        {r: c.loads for r, c in runtime_cells(QuantFormat.int4_awq).items()}
    with pytest.raises(ValueError, match="already in the formats table"):
        register_format(_rtn_row())
    assert QuantFormat.int4_rtn_test is rtn_format and rtn_format in list(QuantFormat)


def test_a_row_the_family_table_cannot_read_is_refused():
    typo = dataclasses.replace(_rtn_row(), name="int4_typo_test",
                               trtllm=dataclasses.replace(FORMATS[QuantFormat.int4_gptq].trtllm, matrix="W4A16 AWQQ"))
    with pytest.raises(ValueError, match="format 'int4_typo_test': trtllm.matrix 'W4A16 AWQQ' is not a column"):
        register_format(typo)
    assert "int4_typo_test" not in QuantFormat
    with pytest.raises(ValueError, match="'int4_typo_test' is not a format in the formats table"):
        QuantFormat("int4_typo_test")


@pytest.mark.slow
def test_a_registered_row_is_checked_planned_built_and_validated(rtn_format, test_model, kiln_home, tmp_path):
    """Check, plan, quantize (ModelOpt), validate (the W4A16 codec) and publish a format that exists only as a
    row registered in this process: about 20 s on the toy, and nothing cheaper shows that no stage keeps a list."""
    from kiln.common.progress import ProgressReporter
    from kiln.pipeline.plan.cache import StageCache
    from kiln.pipeline.plan.dag import make_plan
    from kiln.pipeline.plan.checks import data_problems, model_problems
    from kiln.pipeline.recipe.loader import load_recipe
    from kiln.pipeline.run.runner import run_plan
    from kiln.registry import tracking_uri
    from tests.conftest import write_recipe

    recipe = write_recipe(tmp_path, str(test_model), {"rtn": {"quant": "int4_rtn_test", "gpus": ["sm90"]}},
                          name="rtn", samples=8, seq_len=64)
    loaded = load_recipe(recipe)
    assert loaded.recipe.variants["rtn"].quant is rtn_format
    assert model_problems(loaded, test_model) == [] and data_problems(loaded) == []
    cache = StageCache(kiln_home / "cache")
    plan = make_plan(loaded, kiln_home, cache, tracking_uri(kiln_home))
    quantize_stage = plan.instance("quantize", "rtn")
    assert quantize_stage.status.will_run and quantize_stage.material["config"]["request"]["quant"] == "int4_rtn_test"
    assert [str(c.target) for _, c, _, _ in plan.sm_instances("rtn")] == ["rtn@sm90"]
    result = run_plan(plan, cache, ProgressReporter(enabled=False))
    variant = result.variants[0]
    record = json.loads((cache.entry_dir("quantize", quantize_stage.key) / "kiln.json").read_text())
    assert (record["quant"], record["algorithm"], record["export_quant_algo"]) == ("int4_rtn_test", "max", "W4A16_AWQ")
    assert 0 < variant.metrics.mean_kl < 1 and variant.published is not None
    assert variant.size.bits_per_weight < 16
