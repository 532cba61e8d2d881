"""The GPU layouts: TensorRT-LLM's Triton templates filled from an artifact, parsed with Triton's schema.

The templates here are kiln's fixtures (tests/fixtures/trtllm_templates) with the placeholder
names of TensorRT-LLM's triton_backend/all_models. Every written config.pbtxt is read back with
protobuf's text-format parser into tritonclient's ModelConfig.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from tritonclient.grpc import model_config_pb2 as mc

from kiln.serve.gpu_repo import ENGINE_MODELS, GpuServeOptions, docker_command, write_gpu_layout
from kiln.serve.trtllm_server import server_argv
from kiln.serve.pbtxt import read_config
from kiln.serve.templates import PLACEHOLDER, TemplateError, fill_config

TEMPLATES = Path(__file__).parent / "fixtures" / "trtllm_templates"


def artifact(root: Path, target: str = "trtllm-engine", sm: str = "sm90", tp: int = 1) -> Path:
    """A pulled artifact's files as the GPU layouts read them (engine config, engine.json, options)."""
    sm_dir = root / "artifact" / "engines" / sm
    sm_dir.mkdir(parents=True)
    (root / "artifact" / "hf").mkdir()
    request = {"target": target, "sm": sm, "tp_size": tp, "max_batch_size": 16, "max_input_len": 512,
               "max_seq_len": 1024, "max_num_tokens": 4096, "kv_cache_reuse": True, "free_gpu_memory_fraction": 0.85}
    (sm_dir / "engine.json").write_text(json.dumps({"target": target, "sm": sm, "tensorrt_llm": "1.2.0",
                                                    "request": request}))
    if target == "trtllm-engine":
        (sm_dir / "config.json").write_text(json.dumps({
            "pretrained_config": {"dtype": "bfloat16", "logits_dtype": "float32",
                                  "mapping": {"world_size": tp, "tp_size": tp}},
            "build_config": {"max_batch_size": 16, "max_beam_width": 1, "max_num_tokens": 4096},
        }))
    else:
        (sm_dir / "llm_api_options.yaml").write_text(yaml.safe_dump({
            "tensor_parallel_size": tp, "max_batch_size": 16,
            "kv_cache_config": {"dtype": "fp8", "enable_block_reuse": True, "free_gpu_memory_fraction": 0.85},
        }))
    return root


def parameters(config: mc.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def test_engine_layout_fills_every_config_and_parses_with_tritons_schema(tmp_path):
    repo = artifact(tmp_path / "repo")
    layout = write_gpu_layout(repo, "sm90", GpuServeOptions(templates=TEMPLATES, decoupled=True, instances=3,
                                                            max_queue_delay_microseconds=250, max_queue_size=64))
    assert layout.models == ENGINE_MODELS and layout.entry_model == "ensemble" and layout.world_size == 1
    configs = {}
    for model in ENGINE_MODELS:
        text = (repo / model / "config.pbtxt").read_text()
        assert PLACEHOLDER.search(text) is None and '""' not in text
        configs[model] = read_config(repo / model / "config.pbtxt")
        assert configs[model].name == model and (repo / model / "1").is_dir()

    engine_dir, tokenizer_dir = str(repo / "artifact/engines/sm90"), str(repo / "artifact/hf")
    trtllm = configs["tensorrt_llm"]
    assert trtllm.backend == "tensorrtllm" and trtllm.max_batch_size == 16   # the engine's max_batch_size
    assert trtllm.model_transaction_policy.decoupled is True
    assert list(trtllm.dynamic_batching.preferred_batch_size) == [16]
    assert trtllm.dynamic_batching.max_queue_delay_microseconds == 250
    assert trtllm.dynamic_batching.default_queue_policy.max_queue_size == 64
    inputs = {t.name: t.data_type for t in trtllm.input}
    assert inputs["encoder_input_features"] == mc.TYPE_FP16 and inputs["prompt_embedding_table"] == mc.TYPE_BF16
    assert {t.name: t.data_type for t in trtllm.output}["context_logits"] == mc.TYPE_FP32
    assert parameters(trtllm) == {
        "max_beam_width": "1", "FORCE_CPU_ONLY_INPUT_TENSORS": "no", "gpt_model_type": "inflight_fused_batching",
        "gpt_model_path": engine_dir, "kv_cache_free_gpu_mem_fraction": "0.85", "enable_kv_cache_reuse": "true",
        "exclude_input_in_output": "true", "tokenizer_dir": tokenizer_dir,
    }
    assert layout.dropped["tensorrt_llm"] == ("batch_scheduler_policy", "decoding_mode", "encoder_engine_dir",
                                              "gpu_device_ids", "max_tokens_in_paged_kv_cache")

    pre, post, bls = configs["preprocessing"], configs["postprocessing"], configs["tensorrt_llm_bls"]
    assert parameters(pre) == {"tokenizer_dir": tokenizer_dir, "gpt_model_path": engine_dir}
    assert layout.dropped["preprocessing"] == ("add_special_tokens", "multimodal_model_path")
    assert [g.count for g in pre.instance_group] == [3] and [g.count for g in post.instance_group] == [3]
    assert [g.count for g in bls.instance_group] == [3] and bls.model_transaction_policy.decoupled is True
    assert parameters(bls) == {"accumulate_tokens": "false", "tensorrt_llm_model_name": "tensorrt_llm"}
    assert parameters(post) == {"tokenizer_dir": tokenizer_dir}
    assert configs["ensemble"].max_batch_size == 16
    assert {t.name: t.data_type for t in configs["ensemble"].output}["context_logits"] == mc.TYPE_FP32
    assert (repo / "preprocessing" / "1" / "model.py").read_text() == \
        (TEMPLATES / "inflight_batcher_llm" / "preprocessing" / "1" / "model.py").read_text()


def test_paths_name_the_final_repository_not_the_staging_folder(tmp_path):
    staging = artifact(tmp_path / ".tmp-repo")
    write_gpu_layout(staging, "sm90", GpuServeOptions(templates=TEMPLATES / "inflight_batcher_llm"),
                     final_root=tmp_path / "repo")   # a layout folder itself works as --templates too
    trtllm = parameters(read_config(staging / "tensorrt_llm" / "config.pbtxt"))
    assert trtllm["gpt_model_path"] == str(tmp_path / "repo" / "artifact" / "engines" / "sm90")
    assert read_config(staging / "tensorrt_llm" / "config.pbtxt").model_transaction_policy.decoupled is False


def test_llmapi_layout_carries_the_artifacts_llm_api_options(tmp_path):
    repo = artifact(tmp_path / "repo", target="trtllm-pytorch")
    layout = write_gpu_layout(repo, "sm90", GpuServeOptions(templates=TEMPLATES, decoupled=True))
    assert layout.models == ("tensorrt_llm",) and layout.max_tokens_input == "sampling_param_max_tokens"
    model_yaml = yaml.safe_load((repo / "tensorrt_llm" / "1" / "model.yaml").read_text())
    assert model_yaml == {
        "pipeline_parallel_size": 1, "model": str(repo / "artifact" / "hf"), "backend": "pytorch",
        "tensor_parallel_size": 1, "max_batch_size": 16,
        "kv_cache_config": {"dtype": "fp8", "enable_block_reuse": True, "free_gpu_memory_fraction": 0.85},
        "triton_config": {"max_batch_size": 0, "decoupled": True},
    }
    assert read_config(repo / "tensorrt_llm" / "config.pbtxt").backend == "python"
    assert (repo / "tensorrt_llm" / "1" / "model.py").is_file()
    assert "--disable-auto-complete-config" not in server_argv(repo, layout, (1, 2, 3))


def test_a_mandatory_value_kiln_lacks_is_an_error_and_never_an_empty_string(tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    config = templates / "inflight_batcher_llm" / "tensorrt_llm" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: ${triton_max_batch_size}",
                                                 "max_batch_size: ${max_batch_size_from_a_newer_release}"))
    repo = artifact(tmp_path / "repo")
    with pytest.raises(TemplateError, match="needs max_batch_size_from_a_newer_release, which kiln has no value"):
        write_gpu_layout(repo, "sm90", GpuServeOptions(templates=templates))

    quoted = tmp_path / "quoted.pbtxt"   # a mandatory parameter, though quoted like an optional one
    quoted.write_text('name: "postprocessing"\nparameters { key: "tokenizer_dir" value: { string_value: '
                      '"${tokenizer_dir}" } }\n')
    with pytest.raises(TemplateError, match="needs tokenizer_dir"):
        fill_config(quoted, {}, frozenset({"tokenizer_dir"}))
    with pytest.raises(ValueError, match="empty values for tokenizer_dir"):
        fill_config(quoted, {"tokenizer_dir": ""}, frozenset({"tokenizer_dir"}))


def test_templates_are_required_and_checked(tmp_path):
    repo = artifact(tmp_path / "repo")
    with pytest.raises(Exception, match=r"--templates: .*TensorRT-LLM 1.2.0 .*--branch v1.2.0"):
        write_gpu_layout(repo, "sm90", GpuServeOptions())
    with pytest.raises(Exception, match=r"no inflight_batcher_llm models there"):
        write_gpu_layout(repo, "sm90", GpuServeOptions(templates=TEMPLATES / "llmapi"))


def test_the_launch_command_runs_one_rank_per_gpu_like_tensorrt_llms_launcher(tmp_path):
    repo = artifact(tmp_path / "repo", tp=2)
    layout = write_gpu_layout(repo, "sm90", GpuServeOptions(templates=TEMPLATES))
    assert layout.world_size == 2
    argv = server_argv(repo, layout, (8000, 8001, 8002), address="127.0.0.1")
    assert argv[:2] == ["mpirun", "--allow-run-as-root"] and argv.count(":") == 1
    rank0, rank1 = " ".join(argv[2:]).split(" : ")
    for rank, prefix in ((rank0, "prefix0_"), (rank1, "prefix1_")):
        assert rank.startswith(f"-n 1 /opt/tritonserver/bin/tritonserver --model-repository={repo} ")
        assert "--http-port=8000" in rank and "--http-address=127.0.0.1" in rank
        assert f"--backend-config=python,shm-region-prefix-name={prefix}" in rank
        assert "--disable-auto-complete-config" in rank and "--model-control-mode=explicit" in rank
    assert [a for a in rank0.split() if a.startswith("--load-model")] == [f"--load-model={m}" for m in ENGINE_MODELS]
    assert [a for a in rank1.split() if a.startswith("--load-model")] == ["--load-model=tensorrt_llm"]
    command = docker_command(repo, layout, "nvcr.io/nvidia/tritonserver:25.10-trtllm-python-py3")
    assert command.startswith(f"docker run --rm --gpus all --net host --shm-size=2g --ulimit memlock=-1 -v "
                              f"{repo}:{repo} nvcr.io/nvidia/tritonserver:25.10-trtllm-python-py3 mpirun ")
