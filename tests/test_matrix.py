"""recipes/demo-matrix.yaml: every quantization and KV-cache format builds and validates offline."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import REPO, repo_recipe_beside_model, run_kiln

pytestmark = pytest.mark.slow


def test_every_format_builds_on_cpu(tmp_path, test_model, kiln_home):
    result = run_kiln("build", repo_recipe_beside_model(tmp_path, test_model, "demo-matrix.yaml"), "--json")
    assert result.returncode == 0, result.stderr
    variants = {v["variant"]: v for v in json.loads(result.stdout)["variants"]}
    assert len(variants) == 12
    for name, v in variants.items():
        assert v["registry"]["version"] == "1", name
        assert 0 <= v["metrics"]["mean_kl"] < 0.05, (name, v["metrics"])
    # 8-bit weight-only is all but lossless; 4-bit weights and activations cost the most.
    assert variants["int8-wo"]["metrics"]["mean_kl"] < variants["fp8"]["metrics"]["mean_kl"]
    assert variants["nvfp4-kv-nvfp4"]["metrics"]["mean_kl"] > variants["nvfp4"]["metrics"]["mean_kl"]
    _same_metrics_as_before(variants)

    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{kiln_home / 'registry' / 'mlflow.db'}"
    tags = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("matrix-int4-gptq", "1").tags
    # The export labels GPTQ weights W4A16_AWQ; kiln's own records must not.
    assert tags["kiln.algorithm"] == "gptq" and tags["kiln.quant"] == "int4_gptq"
    record = json.loads(next(kiln_home.glob("cache/quantize/*/kiln.json")).read_text())
    assert "export_quant_algo" in record


PINNED = REPO / "tests" / "fixtures" / "metrics_demo_matrix_f786433.json"


def _same_metrics_as_before(variants: dict) -> None:
    """The lean validation (16-bit storage, float32 math, baseline logits on disk) reports what the float32
    runtime reported: within 1 % relative. A change of perplexity near zero (int8-wo: -0.012 %) moves with the
    summation order at the 1e-5 level, so ppl_increase_pct also passes within 0.002 percentage points."""
    pinned = json.loads(PINNED.read_text())["variants"]
    assert set(pinned) == set(variants)
    for name, before in pinned.items():
        now = variants[name]["metrics"]
        for field in ("baseline_ppl", "quantized_ppl", "mean_kl", "top1_agreement", "ppl_increase_pct"):
            drift = abs(now[field] - before[field])
            allowed = 0.01 * abs(before[field]) + (0.002 if field == "ppl_increase_pct" else 0.0)
            assert drift <= allowed, (name, field, before[field], now[field])


def test_int8_kv_is_refused_with_the_reason(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text((REPO / "recipes" / "demo.yaml").read_text().replace("kv_cache: fp8", "kv_cache: int8"))
    result = run_kiln("check", recipe)
    assert result.returncode == 2
    assert "variants.fp8: kv_cache int8: ModelOpt 0.47 cannot export an INT8 KV cache" in result.stderr
