"""Serve stage: Triton model repositories for registry artifacts, and a tritonserver to run them.

Public entry points:
  start_server(home, ref, stack, progress, ports, ...) -> RunningServer   the front door: pulled, laid out,
      started and ready; .endpoints, .ask(prompt, max_tokens), .stop() (or use it as a context manager)
  write_repository(home, ref, out, stack, progress, ...) -> Repository     pull (verified), gate, lay out only
  ServerProcess / TritonServer(repo, home, models).start() / .stop()       a server process / a tritonserver
  ReferenceGenerator (kiln.serve.generation)                               the same tokens without a server

Stacks (`--stack`, formerly `--runtime`), one class each, registered in kiln.serve.stacks.STACKS; a recipe's
`runtimes:` are loaders (kiln.quantize.Runtime), which a stack row names where it serves through one:
  cpu  (any artifact)   python-backend models running kiln's reference runtime (kiln.serve.cpu_repo)
  gpu  trtllm-engine    TensorRT-LLM's in-flight-batching models, filled (kiln.serve.gpu_repo)
  gpu  trtllm-pytorch   TensorRT-LLM's llmapi model with the artifact's LLM-API options
  vllm (vLLM loads it)  Triton's vLLM backend model; `vllm serve` for kiln serve (kiln.serve.vllm_server)
"""

from __future__ import annotations

import importlib

# Where each public name lives. They load on first use (PEP 562): the CLI reads the stacks table for its
# help without importing Triton's client (about 0.3 s on every `kiln` command).
_EXPORTS = {
    "write_repository": "repository", "STACK_NAMES": "repository", "start_server": "running",
    "RunningServer": "running", "TritonServer": "triton", "ServerProcess": "server", "Endpoints": "server", "CpuServeOptions": "cpu_repo",
    "CPU_MODEL": "cpu_repo", "CPU_STREAM_MODEL": "cpu_repo", "GpuServeOptions": "gpu_repo",
    "Repository": "stack", "ServeFlags": "stack", "Stack": "stack", "STACKS": "stacks", "stack_help": "stacks",
    "stack_named": "stacks", "stack_row": "stacks",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kiln.serve' has no attribute '{name}'")
    return getattr(importlib.import_module(f"kiln.serve.{_EXPORTS[name]}"), name)
