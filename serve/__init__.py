"""Serve stage: Triton model repositories for registry artifacts, and a tritonserver to run them.

Public entry points:
  start_server(home, ref, runtime, progress, ports, ...) -> RunningServer  the front door: pulled, laid out,
      started and ready; .endpoints, .ask(prompt, max_tokens), .stop() (or use it as a context manager)
  write_repository(home, ref, out, runtime, progress, ...) -> Repository   pull (verified) + lay out only
  TritonServer(repo, home, models).start() / .stop()                       a tritonserver process
  ReferenceGenerator (kiln.serve.generation)                               the same tokens without a server

Layouts, by runtime and artifact target:
  cpu  (any artifact)   python-backend models running kiln's reference runtime (kiln.serve.cpu_repo)
  gpu  trtllm-engine    TensorRT-LLM's in-flight-batching models, filled (kiln.serve.gpu_repo)
  gpu  trtllm-pytorch   TensorRT-LLM's llmapi model with the artifact's LLM-API options
"""

from __future__ import annotations

from kiln.serve.cpu_repo import CPU_MODEL, CPU_STREAM_MODEL, CpuServeOptions
from kiln.serve.gpu_repo import GpuServeOptions
from kiln.serve.repository import RUNTIMES, Repository, write_repository
from kiln.serve.running import RunningServer, start_server
from kiln.serve.triton import Endpoints, TritonServer

__all__ = ["Repository", "write_repository", "start_server", "RunningServer", "TritonServer", "Endpoints",
           "CpuServeOptions", "GpuServeOptions", "CPU_MODEL", "CPU_STREAM_MODEL", "RUNTIMES"]
