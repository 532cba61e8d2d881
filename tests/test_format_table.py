"""One row per format (issue 14.5): every fact about a quantization format lives in quantize/formats.py,
and the stages read it from there. A row missing its export name, its TensorRT-LLM mapping or a codec
in validate is named here, before it could fail in a build."""

from __future__ import annotations

import dataclasses

from kiln.compile import ARCHS
from kiln.quantize import FORMATS, KV_CACHE_FORMATS, FormatSpec, KVCacheFormat, QuantFormat
from kiln.validate.codecs import KV_CODECS, WEIGHT_CODECS


def format_table_problems(formats=FORMATS, kv_caches=KV_CACHE_FORMATS) -> list[str]:
    problems = []
    for quant, spec in formats.items():
        where = f"FORMATS[{quant.value}]"
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


def test_a_new_row_without_its_codec_or_mapping_is_named():
    int4_awq = FORMATS[QuantFormat.int4_awq]
    new = dataclasses.replace(int4_awq, export_quant_algo="W4A16_NEW", trtllm=None)
    bare = dataclasses.replace(int4_awq, export_quant_algo="")
    kv = dataclasses.replace(KV_CACHE_FORMATS[KVCacheFormat.fp8], export_algo="FP6")
    assert format_table_problems({QuantFormat.int4_awq: new, QuantFormat.int4_gptq: bare},
                                 {KVCacheFormat.fp8: kv}) == [
        "FORMATS[int4_awq]: validate has no weight codec for quant_algo W4A16_NEW (add it to validate/codecs.py "
        "WEIGHT_CODECS)",
        "FORMATS[int4_awq]: no TensorRT-LLM mapping (FormatSpec.trtllm: weight packing, GEMM plugin)",
        "FORMATS[int4_gptq]: no export_quant_algo (the quant_algo ModelOpt writes for it)",
        "KV_CACHE_FORMATS[fp8]: validate has no KV codec for FP6",
    ]


def test_the_stages_read_their_format_facts_from_the_row():
    from kiln.compile.engine import gemm_plugin, uses_fp8_context_fmha
    from kiln.compile.llmapi import kv_cache_dtype
    from kiln.compile.targets import CheckpointQuant
    from kiln.quantize.trtllm_checks import _PACKED_FP4_ALGOS, _PACKED_INT4_ALGOS

    def quant(algo, kv=None):
        return CheckpointQuant(quant_algo=algo, kv_cache_quant_algo=kv, tp_size=1)

    assert _PACKED_INT4_ALGOS == {"W4A16_AWQ", "W4A8_AWQ"} and _PACKED_FP4_ALGOS == {"NVFP4"}
    assert [gemm_plugin(quant(a)) for a in ("FP8", "NVFP4", "W4A16_AWQ", None)] == ["fp8", "nvfp4", "auto", "auto"]
    assert [kv_cache_dtype(quant("FP8", kv)) for kv in ("FP8", "NVFP4", None)] == ["fp8", "nvfp4", "auto"]
    assert [sm for sm in ARCHS if uses_fp8_context_fmha(quant("FP8", "FP8"), sm)] == ["sm89", "sm90"]
    assert isinstance(FORMATS[QuantFormat.fp8], FormatSpec)
