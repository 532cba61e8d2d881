"""Compile stage: TensorRT-LLM artifacts per GPU architecture.

Public now: the GPU-architecture table (`resolve_gpu`, `support_problem`, `ARCHS`),
the one source kiln consults for what each GPU can run. The engine builds per SM
(trtllm-build / PyTorch-backend options) arrive with the compile issue.
"""

from kiln.compile.gpus import ARCHS, GpuArch, known_names, resolve_gpu, support_problem

__all__ = ["ARCHS", "GpuArch", "known_names", "resolve_gpu", "support_problem"]
