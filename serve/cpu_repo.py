"""The CPU layout: one decoupled python-backend model serving a kiln artifact with the reference runtime."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from kiln.serve.pbtxt import set_parameters, tensor, write_config
from kiln.serve.requests import Limits, artifact_limits

CPU_MODEL = "kiln_llm"                  # one response per request: HTTP and gRPC infer
CPU_STREAM_MODEL = "kiln_llm_stream"    # decoupled: one response per token over gRPC streaming
ARTIFACT_DIR = "artifact"               # beside the models, shared by both
_MODEL_SOURCE = Path(__file__).parent / "cpu_model" / "model.py"


@dataclass(frozen=True)
class CpuServeOptions:
    max_batch_size: int = 8
    max_queue_delay_microseconds: int = 1000
    instances: int = 1
    default_max_tokens: int = 64
    trust_remote_code: bool = False


def cpu_model_config(name: str, options: CpuServeOptions, limits: Limits) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=options.max_batch_size)
    tensor(config.input, "text_input", "BYTES", [1])
    tensor(config.input, "max_tokens", "INT32", [1], optional=True)
    tensor(config.output, "text_output", "BYTES", [1])
    tensor(config.output, "output_ids", "INT32", [-1])
    if name == CPU_STREAM_MODEL:
        tensor(config.input, "stream", "BOOL", [1], optional=True)
        config.model_transaction_policy.decoupled = True
    config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_microseconds
    group = config.instance_group.add()
    group.count, group.kind = options.instances, mc.ModelInstanceGroup.KIND_CPU
    set_parameters(config, {"artifact": f"../{ARTIFACT_DIR}", **limits.as_parameters(),
                            "trust_remote_code": "true" if options.trust_remote_code else "false"})
    return config


def write_cpu_repository(repo: Path, options: CpuServeOptions) -> tuple[str, ...]:
    """Both models around the pulled artifact at <repo>/artifact/; returns the model names."""
    if not (Path(repo) / ARTIFACT_DIR / "hf").is_dir():
        raise FileNotFoundError(f"{repo}/{ARTIFACT_DIR}/hf: pull the artifact there first")
    # The artifact's own limits: a request past them would hold the only instance for minutes.
    limits = artifact_limits(Path(repo) / ARTIFACT_DIR, options.default_max_tokens)
    for name in (CPU_MODEL, CPU_STREAM_MODEL):
        (Path(repo) / name / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_MODEL_SOURCE, Path(repo) / name / "1" / "model.py")
        write_config(cpu_model_config(name, options, limits), Path(repo) / name)
    return (CPU_MODEL, CPU_STREAM_MODEL)
