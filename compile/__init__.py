"""Compile stage: TensorRT-LLM artifacts per GPU architecture.

Public entry points:
  detect_host() -> Host                         GPUs by SM and NVIDIA tool versions, without CUDA
  run(request, checkpoint_dir, out, host, progress) -> dict   engines/<sm>/ with engine.json
  resolve_gpu / support_problem / ARCHS         the GPU-architecture table, the one source of truth

Targets are registered by type in BUILDERS: trtllm-engine runs `trtllm-build`;
trtllm-pytorch writes the LLM-API options the PyTorch backend reads.
"""

from __future__ import annotations

from kiln.compile.gpus import ARCHS, GpuArch, known_names, resolve_gpu, support_problem
from kiln.compile.host import Host, HostGpu, detect_host, first_installed
from kiln.compile.stage import STAGE_VERSION, load_record, run, sm_folder, tools
from kiln.compile.targets import (
    CHECK_REPORT, ENGINE_RECORD, LLM_API_OPTIONS, SM_DIR, CheckpointQuant, CompileRequest, Target,
)

__all__ = [
    "ARCHS", "GpuArch", "known_names", "resolve_gpu", "support_problem", "Host", "HostGpu", "detect_host",
    "first_installed", "CompileRequest", "Target", "run", "tools", "sm_folder", "STAGE_VERSION", "SM_DIR",
    "ENGINE_RECORD", "CHECK_REPORT", "LLM_API_OPTIONS", "load_record", "CheckpointQuant",
]
