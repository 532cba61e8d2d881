"""A Triton model repository for a registry artifact, written atomically (the layouts: cpu_repo, gpu_repo,
vllm_repo)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kiln.common.errors import UserInputError
from kiln.common.fsutil import atomic_dir, require_empty_folder
from kiln.serve.cpu_repo import ARTIFACT_DIR, CPU_MODEL, CPU_STREAM_MODEL, CpuServeOptions, write_cpu_repository
from kiln.serve.gpu_repo import GpuLayout, GpuServeOptions, docker_command, write_gpu_layout
from kiln.serve.vllm_repo import VllmServeOptions, vllm_docker_command, write_vllm_repository

RUNTIMES = ("cpu", "gpu", "vllm")


@dataclass(frozen=True)
class Repository:
    path: Path
    name: str
    version: str
    runtime: str
    models: tuple[str, ...]
    entry_model: str             # the model a client sends text to
    stream_model: str | None     # the decoupled model for token streaming (gRPC)
    sm: str | None = None
    gpu_layout: GpuLayout | None = None
    container_command: str | None = None


def write_repository(home: Path, ref: str, out: Path, runtime: str, progress,
                     cpu_options: CpuServeOptions = CpuServeOptions(),
                     gpu_options: GpuServeOptions = GpuServeOptions(), sm: str | None = None,
                     installed_tensorrt: str | None = None,
                     vllm_options: VllmServeOptions = VllmServeOptions()) -> Repository:
    """Pull `ref` (verified) and write a complete Triton model repository at `out`, atomically.

    The GPU runtime needs `sm`: the engines of that SM only are pulled (refused when the version
    holds none, or when they were built with another TensorRT than `installed_tensorrt`).
    """
    from kiln.registry import pull

    if runtime not in RUNTIMES:
        raise UserInputError(f"--runtime {runtime}: not one of {', '.join(RUNTIMES)}")
    if runtime == "gpu" and sm is None:
        raise UserInputError("--runtime gpu: this host has no GPU, so name the SM the repository is for "
                             "(fix: --gpu sm90, or --gpu H100)")
    out = require_empty_folder(out)
    with atomic_dir(out, shared=False) as staging:
        pulled = pull(home, ref, staging / ARTIFACT_DIR, progress, sm=sm if runtime == "gpu" else None,
                      installed_tensorrt=installed_tensorrt)
        if runtime == "cpu":
            models = write_cpu_repository(staging, cpu_options)
            return Repository(out, pulled.name, pulled.version, runtime, models, CPU_MODEL, CPU_STREAM_MODEL)
        if runtime == "vllm":
            model = write_vllm_repository(staging, staging / ARTIFACT_DIR, pulled.name, vllm_options, final_root=out)
            return Repository(out, pulled.name, pulled.version, runtime, (model,), model, model,
                              container_command=vllm_docker_command(out, model, vllm_options.container))
        # The configs name files by absolute path: the path they will have once `staging` becomes `out`.
        layout = write_gpu_layout(staging, sm, gpu_options, final_root=out)
    return Repository(out, pulled.name, pulled.version, runtime, layout.models, layout.entry_model,
                      layout.stream_model, sm, layout, docker_command(out, layout, gpu_options.container))
