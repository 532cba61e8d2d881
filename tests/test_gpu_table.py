"""The GPU-architecture table in kiln.compile, and every refusal it drives in `kiln check`."""

from __future__ import annotations

import re

import pytest

from kiln.compile import ARCHS, resolve_gpu, support_problem
from kiln.quantize.formats import FORMATS, KV_CACHE_FORMATS, KVCacheFormat, QuantFormat
from tests.conftest import run_kiln


@pytest.mark.parametrize("name, sm", [
    ("A100", "sm80"), ("a30", "sm80"), ("A10", "sm86"), ("L40S", "sm89"), ("l4", "sm89"), ("H100", "sm90"),
    ("h200", "sm90"), ("GH200", "sm90"), ("B200", "sm100"), ("gb200", "sm100"), ("RTX 5090", "sm120"),
    ("rtx-5090", "sm120"), ("RTX  PRO 6000", "sm120"), ("SM90", "sm90"), ("sm120", "sm120"),
])
def test_gpu_names_resolve_case_insensitively(name, sm):
    assert resolve_gpu(name).sm == sm


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown GPU 'V100'; use an SM or GPU name: sm80 \(A100/A30\)"):
        resolve_gpu("V100")


def test_every_format_runs_somewhere_and_the_table_names_only_known_formats():
    runnable = set().union(*(arch.formats for arch in ARCHS.values()))
    assert runnable == set(FORMATS)
    kv = set().union(*(arch.kv_caches for arch in ARCHS.values()))
    assert kv == set(KV_CACHE_FORMATS)


@pytest.mark.parametrize("quant, kv, gpu, runs", [
    (QuantFormat.fp8, KVCacheFormat.fp8, "sm89", True),
    (QuantFormat.fp8, KVCacheFormat.none, "A100", False),
    (QuantFormat.nvfp4, KVCacheFormat.none, "H100", False),
    (QuantFormat.nvfp4, KVCacheFormat.nvfp4, "B200", True),
    (QuantFormat.int8_sq, KVCacheFormat.none, "B200", False),
    (QuantFormat.int8_wo, KVCacheFormat.none, "B200", False),
    (QuantFormat.int4_awq, KVCacheFormat.none, "A10", True),
    (QuantFormat.int4_awq, KVCacheFormat.none, "RTX 5090", False),
    (QuantFormat.w4a8_awq, KVCacheFormat.fp8, "L40S", True),
    (QuantFormat.w4a8_awq, KVCacheFormat.fp8, "A100", False),
    (QuantFormat.fp8_pc_pt, KVCacheFormat.none, "H200", True),
    (QuantFormat.fp8_pc_pt, KVCacheFormat.none, "L40S", False),
    (QuantFormat.fp8, KVCacheFormat.nvfp4, "H100", False),
    (QuantFormat.fp8, KVCacheFormat.int8, "B200", False),
])
def test_support_matrix(quant, kv, gpu, runs):
    assert (support_problem(quant, kv, gpu) is None) == runs


GOOD = """\
kiln: 1
name: g
model: {{source: hf://acme/m, revision: 0123456789abcdef0123456789abcdef01234567}}
calibration: {{builtin: python-docs-train}}
evaluation: {{builtin: python-docs-heldout}}
variants:
  v:
    quant: {quant}
    kv_cache: {kv}
    gpus: [{gpus}]
"""

def _runs(sm: str) -> str:
    """What a refusal lists for an SM, read from the tables: a new format row changes it, not this test."""
    arch = ARCHS[sm]
    formats = ", ".join(sorted(q.value for q, spec in FORMATS.items() if spec.kernel in arch.kernels))
    return re.escape(f"{sm} runs {formats}; KV cache {', '.join(sorted(k.value for k in arch.kv_caches))}")


REFUSALS = [
    ("fp8", "none", "A100", r"A100 \(sm80\) cannot run fp8; " + _runs("sm80")),
    ("nvfp4", "none", "sm90", r"sm90 cannot run nvfp4; " + _runs("sm90")),
    ("int8_sq", "none", "B200", r"B200 \(sm100\) cannot run int8_sq; " + _runs("sm100")),
    ("fp8_pc_pt", "none", "L40S", r"L40S \(sm89\) cannot run fp8_pc_pt"),
    ("int4_gptq", "none", "RTX 5090", r"RTX 5090 \(sm120\) cannot run int4_gptq"),
    ("fp8", "nvfp4", "H100", r"H100 \(sm90\) cannot run a nvfp4 KV cache"),
    ("w4a8_awq", "none", "A10", r"A10 \(sm86\) cannot run w4a8_awq"),
]


def test_check_refuses_formats_a_gpu_cannot_run(tmp_path):
    paths = []
    for i, (quant, kv, gpu, _) in enumerate(REFUSALS):
        path = tmp_path / f"r{i}.yaml"
        path.write_text(GOOD.format(quant=quant, kv=kv, gpus=f"sm90, '{gpu}'" if gpu != "sm90" else gpu))
        paths.append(path)
    result = run_kiln("check", *paths)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(REFUSALS)
    for path, (quant, _, _, pattern), line in zip(paths, REFUSALS, lines):
        assert line.startswith(f"kiln: {path}:7: variants.v:"), line
        assert re.search(pattern, line), line
        assert line.endswith("(fix: drop that GPU or choose a format it runs)")


def test_check_accepts_what_every_named_gpu_runs(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(GOOD.format(quant="fp8", kv="fp8", gpus="L40S, h100, 'RTX 5090', b200"))
    assert run_kiln("check", path).returncode == 0
