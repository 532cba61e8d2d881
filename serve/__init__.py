"""Serve stage: Triton model repositories for registry artifacts, and a tritonserver to run them.

Public entry points:
  write_repository(home, ref, out, runtime, progress, ...) -> Repository   pull (verified) + lay out
  TritonServer(repo, home).start() / .stop()                               the CPU tritonserver
  ReferenceGenerator (kiln.serve.generation)                               the same tokens without a server

Layouts, by runtime and artifact target:
  cpu  (any artifact)   one decoupled python-backend model running kiln's reference runtime
  gpu  trtllm-engine    TensorRT-LLM backend's in-flight-batching models (arrives with the GPU layouts)
  gpu  trtllm-pytorch   the llmapi model (arrives with the GPU layouts)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kiln.pipeline.errors import UserInputError
from kiln.pipeline.fsutil import atomic_dir, require_empty_folder
from kiln.serve.cpu_repo import ARTIFACT_DIR, CPU_MODEL, CPU_STREAM_MODEL, CpuServeOptions, write_cpu_repository
from kiln.serve.triton import Endpoints, TritonServer

__all__ = ["Repository", "write_repository", "TritonServer", "Endpoints", "CpuServeOptions", "CPU_MODEL",
           "CPU_STREAM_MODEL"]


@dataclass(frozen=True)
class Repository:
    path: Path
    name: str
    version: str
    runtime: str
    models: tuple[str, ...]
    entry_model: str             # the model a client sends text to
    stream_model: str | None     # the decoupled model for token streaming (gRPC)


def write_repository(home: Path, ref: str, out: Path, runtime: str, progress,
                     cpu_options: CpuServeOptions = CpuServeOptions()) -> Repository:
    """Pull `ref` (verified) and write a complete Triton model repository at `out`, atomically."""
    from kiln.registry import pull

    out = require_empty_folder(out)
    if runtime != "cpu":
        raise UserInputError(f"--runtime {runtime}: only `cpu` repositories are written so far")
    with atomic_dir(out) as staging:
        pulled = pull(home, ref, staging / ARTIFACT_DIR, progress, sm=None)
        models = write_cpu_repository(staging, cpu_options)
    return Repository(out, pulled.name, pulled.version, runtime, models, CPU_MODEL, CPU_STREAM_MODEL)
