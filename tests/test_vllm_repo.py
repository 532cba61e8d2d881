"""`kiln triton-repo REF --stack vllm` (issue 15.4): a model for Triton's vLLM backend whose engine arguments
come from the artifact, parsed back with Triton's schema; refused where the runtimes table says vLLM cannot load."""

from __future__ import annotations

import json
import shlex

import pytest

from kiln.common.progress import SILENT
from kiln.registry import publish
from kiln.registry.tags import checkpoint_tags
from kiln.serve.pbtxt import read_config
from tests.conftest import run_kiln


def _publish(home, tmp_path, name: str, quant: str, kv_cache: str, backend: str, max_seq_len: int = 4096,
             positions: int = 2048) -> None:
    """A version holding what the layout reads: kiln.json, hf/config.json and recipe.json."""
    folder = tmp_path / name
    (folder / "hf").mkdir(parents=True)
    (folder / "kiln.json").write_text(json.dumps({"quant": quant, "kv_cache": kv_cache, "backend": backend}))
    (folder / "hf" / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": positions}))
    (folder / "recipe.json").write_text(json.dumps({"build": {"max_seq_len": max_seq_len, "max_input_len": 1024}}))
    files = {rel: folder / rel for rel in ("kiln.json", "hf/config.json", "recipe.json")}
    tags = checkpoint_tags(publish_key=name, recipe="r", recipe_digest="d", variant=name, source="local:x", revision="x",
                           quant=quant, kv_cache=kv_cache, backend=backend, algorithm="max", export_quant_algo="",
                           group_size="", metrics={}, tools={}, passed=True, failures=[])
    publish(home, f"r-{name}", files, tags, ["candidate"], SILENT)


@pytest.mark.parametrize("name, quant, kv_cache, backend, quantization, kv_dtype", [
    ("pcpt", "fp8_pc_pt", "none", "modelopt", "modelopt", "auto"),
    ("fp8kv", "fp8", "fp8", "modelopt", "modelopt", "fp8"),
    ("w8a8", "int8_sq", "none", "llmcompressor", "compressed-tensors", "auto"),
])
def test_the_vllm_repository_carries_the_artifacts_engine_arguments(kiln_home, tmp_path, name, quant, kv_cache,
                                                                     backend, quantization, kv_dtype):
    _publish(kiln_home, tmp_path, name, quant, kv_cache, backend)
    out = tmp_path / "repo"
    result = run_kiln("triton-repo", f"r-{name}@candidate", "--stack", "vllm", "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    model = f"r-{name}"
    assert document["models"] == [model] and document["runtime"] == "vllm"

    arguments = json.loads((out / model / "1" / "model.json").read_text())
    assert arguments == {"model": str(out / "artifact" / "hf"), "tokenizer": str(out / "artifact" / "hf"),
                         "quantization": quantization, "kv_cache_dtype": kv_dtype,
                         "max_model_len": 2048,   # the recipe's 4096, within the model's 2048 positions
                         "gpu_memory_utilization": 0.9}
    config = read_config(out / model / "config.pbtxt")
    assert config.name == model and config.backend == "vllm" and config.max_batch_size == 0
    assert config.model_transaction_policy.decoupled
    assert [i.name for i in config.input] == ["text_input", "stream", "sampling_parameters"]
    assert [o.name for o in config.output] == ["text_output"]

    argv = shlex.split(document["container_command"])
    assert "nvcr.io/nvidia/tritonserver:<yy.mm>-vllm-python-py3" in argv
    assert f"{out}:{out}" in argv   # mounted where model.json says the checkpoint is
    assert argv[argv.index("tritonserver"):] == [
        "tritonserver", f"--model-repository={out}", "--model-control-mode=explicit", f"--load-model={model}",
        "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"]


def test_a_format_vllm_cannot_load_is_refused_with_the_alternative(kiln_home, tmp_path):
    _publish(kiln_home, tmp_path, "awq", "int4_awq", "none", "modelopt")
    out = tmp_path / "repo"
    result = run_kiln("triton-repo", "r-awq@candidate", "--runtime", "vllm", "--out", out)   # the option's older name
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("kiln: --stack vllm: vllm does not load int4_awq (vLLM 0.32.0")
    assert "set backend: llmcompressor" in line
    assert not out.exists() or not any(out.iterdir())


def test_a_relative_out_becomes_absolute_paths_in_model_json_and_the_mount(kiln_home, tmp_path):
    """Issue 24.14: `--out vr2` wrote relative paths into model.json and `-v vr2:vr2` (a named volume)."""
    _publish(kiln_home, tmp_path, "fp8kv", "fp8", "fp8", "modelopt")
    result = run_kiln("triton-repo", "r-fp8kv@candidate", "--stack", "vllm", "--out", "vr2", "--json",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = (tmp_path / "vr2").resolve()
    document = json.loads(result.stdout)
    assert document["path"] == str(out)
    arguments = json.loads((out / "r-fp8kv" / "1" / "model.json").read_text())
    assert arguments["model"] == arguments["tokenizer"] == str(out / "artifact" / "hf")
    argv = shlex.split(document["container_command"])
    assert argv[argv.index("-v") + 1] == f"{out}:{out}"
