"""The vLLM layout: one model for Triton's vLLM backend, its engine arguments taken from the artifact.

    <out>/artifact/...              the pulled, verified version (hf/ is what vLLM loads)
    <out>/<name>/config.pbtxt       backend "vllm", decoupled, vLLM's own inputs and outputs
    <out>/<name>/1/model.json       vLLM engine arguments: model path, quantization, KV-cache dtype, max_model_len

NVIDIA's `tritonserver:<yy.mm>-vllm-python-py3` container serves it; the repository names files by
absolute path, so it is mounted at the same path inside the container.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from kiln.serve.pbtxt import tensor, write_config
from kiln.serve.requests import artifact_limits

VLLM_CONTAINER = "nvcr.io/nvidia/tritonserver:<yy.mm>-vllm-python-py3"
MODEL_JSON = "model.json"
# What vLLM's `quantization` argument calls each checkpoint kind (vllm/model_executor/layers/quantization).
QUANTIZATION = {"modelopt": "modelopt", "llmcompressor": "compressed-tensors"}
KV_CACHE_DTYPE = {"none": "auto", "fp8": "fp8"}


@dataclass(frozen=True)
class VllmServeOptions:
    gpu_memory_utilization: float = 0.9
    container: str = VLLM_CONTAINER


def engine_args(artifact: Path, hf_dir: Path, options: VllmServeOptions) -> dict:
    """vLLM engine arguments for the artifact (which kiln.serve.repository gated by the runtimes table)."""
    record = json.loads((artifact / "kiln.json").read_text())
    backend, kv_cache = record.get("backend", "modelopt"), record["kv_cache"]
    limits = artifact_limits(artifact, default_max_tokens=1)
    return {"model": str(hf_dir), "tokenizer": str(hf_dir), "quantization": QUANTIZATION[backend],
            "kv_cache_dtype": KV_CACHE_DTYPE[kv_cache], "max_model_len": limits.max_seq_len,
            "gpu_memory_utilization": options.gpu_memory_utilization}


def model_name(registered: str) -> str:
    """Triton model names are folder names: the registered name with anything else replaced."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", registered)


def vllm_model_config(name: str) -> mc.ModelConfig:
    """Triton's vLLM backend model: vLLM batches, so Triton does not (max_batch_size 0), and responses stream."""
    config = mc.ModelConfig(name=name, backend="vllm", max_batch_size=0)
    config.model_transaction_policy.decoupled = True
    tensor(config.input, "text_input", "BYTES", [1])
    tensor(config.input, "stream", "BOOL", [1], optional=True)
    tensor(config.input, "sampling_parameters", "BYTES", [1], optional=True)
    tensor(config.output, "text_output", "BYTES", [-1])
    group = config.instance_group.add()
    group.count, group.kind = 1, mc.ModelInstanceGroup.KIND_MODEL   # vLLM places the model on the devices
    return config


def write_vllm_repository(staging: Path, artifact: Path, registered: str, options: VllmServeOptions,
                          final_root: Path) -> str:
    """Write the model into `staging` (naming files as they will be under `final_root`); returns its name."""
    name = model_name(registered)
    arguments = engine_args(artifact, final_root / artifact.relative_to(staging) / "hf", options)
    write_config(vllm_model_config(name), staging / name)
    (staging / name / "1").mkdir(parents=True, exist_ok=True)
    (staging / name / "1" / MODEL_JSON).write_text(json.dumps(arguments, indent=2, sort_keys=True) + "\n")
    return name


def vllm_docker_command(repo: Path, model: str, container: str, ports=(8000, 8001, 8002)) -> str:
    """The `docker run` that serves this repository in NVIDIA's vLLM Triton container. The model is loaded
    explicitly: the artifact folder beside it is not a model."""
    http, grpc, metrics = ports
    mount = shlex.quote(f"{repo}:{repo}")
    return " ".join(["docker run --rm --gpus all --net host --shm-size=2g -v", mount, container,
                     shlex.join(["tritonserver", f"--model-repository={repo}", "--model-control-mode=explicit",
                                 f"--load-model={model}", f"--http-port={http}", f"--grpc-port={grpc}",
                                 f"--metrics-port={metrics}"])])
