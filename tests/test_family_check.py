"""`kiln check` against the family table: unknown families, targets without a checkpoint, formats
TensorRT-LLM does not list for a family, and sliding windows the engine flow would ignore.
Each is one line naming the recipe, the field and the fix, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest

from kiln.quantize import FAMILIES
from tests.conftest import run_kiln, write_recipe

FP8 = {"quant": "fp8", "kv_cache": "fp8"}


def _config_only_model(folder, model_type: str, **extra):
    """A model folder with config.json and a token weights file: what `kiln check` reads, without a model."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"model.norm.weight": torch.ones(128)}, folder / "model.safetensors")
    config = {"model_type": model_type, "architectures": [FAMILIES[model_type].architecture if model_type in FAMILIES
                                                           else "FalconForCausalLM"],
              "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 2, "vocab_size": 512, "max_position_embeddings": 512, **extra}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _check(tmp_path, model_type, variants, build=None, **extra):
    model = _config_only_model(tmp_path / "model", model_type, **extra)
    recipe = write_recipe(tmp_path, str(model), variants, **({"build": build} if build else {}))
    result = run_kiln("check", recipe, env={"KILN_HOME": str(tmp_path / "home")})
    return recipe, result


def test_a_family_without_a_trtllm_checkpoint_is_sent_to_the_pytorch_backend(tmp_path):
    recipe, result = _check(tmp_path, "gemma2", {"fp8": FP8})
    assert result.returncode == 2, result.stderr
    assert (f"{recipe}: model: Gemma 2 has no TensorRT-LLM checkpoint: ModelOpt 0.47 writes no TensorRT-LLM "
            "checkpoint for gemma2") in result.stderr
    assert "fix: set build.target: trtllm-pytorch" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "home").exists()
    _, ok = _check(tmp_path / "again", "gemma2", {"fp8": FP8}, build={"target": "trtllm-pytorch"})
    assert ok.returncode == 0, ok.stderr


def test_a_format_the_family_does_not_support_is_refused(tmp_path):
    recipe, result = _check(tmp_path, "mixtral", {"awq": {"quant": "int4_awq", "group_size": 64}, "fp8": FP8},
                            build={"target": "trtllm-pytorch"}, num_local_experts=4, num_experts_per_tok=2)
    assert result.returncode == 2
    assert (f"{recipe}: variants.awq: int4_awq is not a format TensorRT-LLM supports for Mixtral (MoE) with target "
            "trtllm-pytorch (it supports fp8, nvfp4; source: [pt-matrix] Mixtral") in result.stderr
    assert "variants.fp8" not in result.stderr


def test_qwen_nvfp4_needs_the_pytorch_backend(tmp_path):
    _, engine = _check(tmp_path, "qwen2", {"nvfp4": {"quant": "nvfp4"}})
    assert engine.returncode == 2 and "nvfp4 is not a format TensorRT-LLM supports for Qwen2, Qwen2.5 with " \
                                      "target trtllm-engine" in engine.stderr
    _, pytorch = _check(tmp_path / "pt", "qwen2", {"nvfp4": {"quant": "nvfp4"}}, build={"target": "trtllm-pytorch"})
    assert pytorch.returncode == 0, pytorch.stderr


def test_an_unknown_family_is_refused(tmp_path):
    recipe, result = _check(tmp_path, "falcon", {"fp8": FP8})
    assert result.returncode == 2
    assert f"{recipe}: model: model_type 'falcon' is not in kiln's family table (gemma2, gemma3_text, llama," in result.stderr


@pytest.mark.parametrize("max_seq_len, ok", [(2048, False), (64, True)])
def test_a_sliding_window_the_engine_would_ignore_is_refused(tmp_path, max_seq_len, ok):
    _, result = _check(tmp_path, "mistral", {"fp8": FP8}, sliding_window=64,
                       build={"max_input_len": 32, "max_seq_len": max_seq_len})
    assert (result.returncode == 0) is ok, result.stderr
    if not ok:
        assert "sliding_window 64 is shorter than build.max_seq_len 2048" in result.stderr
        assert "fix: set build.max_seq_len to at most 64, or build.target: trtllm-pytorch" in result.stderr


def test_the_readme_table_is_generated_from_the_family_table():
    from kiln.pipeline.cli.families_doc import README_BEGIN, README_END, families_markdown
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    section = readme.split(README_BEGIN + "\n", 1)[1].split(README_END, 1)[0]
    assert section == families_markdown(), "README is stale: paste `kiln families --markdown` between the markers"
    for family in FAMILIES.values():
        assert f"(`{family.model_type}`)" in section


def test_kiln_families_json_cites_every_field(tmp_path):
    result = run_kiln("families", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["model_type"]: row for row in json.loads(result.stdout)}
    assert rows["qwen2"]["trtllm_checkpoint"]["fields"]["qwen_type"] == {
        "from": "model_type", "cites": "[qwen-cfg]", "proven_by_tensor": None}
    assert rows["mixtral"]["trtllm_checkpoint"] is None and "QuantMixtralExperts" in rows["mixtral"]["no_trtllm_checkpoint"]
    assert rows["llama"]["formats"]["trtllm-engine"] == sorted(q.value for q in FAMILIES["llama"].engine_formats)


def test_plan_says_what_a_family_without_a_checkpoint_publishes(tmp_path):
    model = _config_only_model(tmp_path / "model", "phi3")
    recipe = write_recipe(tmp_path, str(model), {"fp8": FP8}, build={"target": "trtllm-pytorch"})
    env = {"KILN_HOME": str(tmp_path / "home")}
    document = json.loads(run_kiln("plan", recipe, "--json", env=env).stdout)
    assert document["family"]["model_type"] == "phi3" and document["family"]["trtllm_checkpoint"] is False
    table = run_kiln("plan", recipe, env={**env, "COLUMNS": "400"})
    assert table.returncode == 0, table.stderr
    assert "model family Phi-3, Phi-4 (phi3): each variant publishes hf/ only, for target trtllm-pytorch" in table.stdout
