"""NVIDIA's tritonserver with TensorRT-LLM's backend: finding it, its argv under mpirun (one rank per GPU, as
TensorRT-LLM's launch_triton_server.py runs it), and the server process for a GPU layout (kiln.serve.gpu_repo)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kiln.common.errors import KilnError
from kiln.serve.server import Endpoints
from kiln.serve.triton import TritonServer

TRITONSERVER = "/opt/tritonserver/bin/tritonserver"     # where NVIDIA's container has it


def server_argv(repo: Path, layout, ports: tuple[int, int, int], tritonserver: str = TRITONSERVER,
                address: str | None = None) -> list[str]:
    """tritonserver under mpirun, one rank per GPU, as TensorRT-LLM's launch_triton_server.py runs it, for a
    kiln.serve.gpu_repo.GpuLayout.

    Every rank loads explicitly named models (the artifact folder is not one): rank 0 all of
    them, the others only tensorrt_llm; each rank gets its own python shared-memory prefix.
    """
    http, grpc, metrics = ports
    argv = ["mpirun", "--allow-run-as-root"]
    for rank in range(layout.world_size):
        argv += ["-n", "1", tritonserver, f"--model-repository={repo}",
                 f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}"]
        if address:
            argv += [f"--http-address={address}", f"--grpc-address={address}", f"--metrics-address={address}"]
        argv += ["--model-control-mode=explicit"]
        argv += [f"--load-model={m}" for m in (layout.models if rank == 0 else ("tensorrt_llm",))]
        if layout.disable_auto_complete:
            argv += ["--disable-auto-complete-config"]
        argv += [f"--backend-config=python,shm-region-prefix-name=prefix{rank}_", ":"]
    return argv[:-1]


def trtllm_tritonserver(target_needs_backend: bool) -> Path:
    """NVIDIA's tritonserver with TensorRT-LLM's backend ($KILN_TRITONSERVER, else the container's path)."""
    binary = Path(os.environ.get("KILN_TRITONSERVER", TRITONSERVER))
    problem = None
    if not binary.is_file():
        problem = f"no tritonserver at {binary}"
    elif target_needs_backend and not (binary.parent.parent / "backends" / "tensorrtllm").is_dir():
        problem = f"{binary} has no tensorrtllm backend beside it"
    elif shutil.which("mpirun") is None:
        problem = "no mpirun on PATH"
    if problem:
        raise KilnError(f"{problem}: the GPU runtime runs in NVIDIA's TensorRT-LLM Triton container "
                        "(fix: run `kiln triton-repo ... --stack gpu`, which prints its `docker run`, or run "
                        "kiln inside that container, or set KILN_TRITONSERVER)")
    return binary


class TrtllmTritonServer(TritonServer):
    """NVIDIA's tritonserver under mpirun (one rank per GPU), on loopback, for a GPU layout."""

    def __init__(self, repo: Path, home: Path, layout, binary: Path, endpoints: Endpoints | None = None,
                 log_path: Path | None = None):
        super().__init__(repo, home, layout.models, endpoints, log_path)
        self.layout, self.binary = layout, binary

    def command(self) -> list[str]:
        ports = (self.endpoints.http, self.endpoints.grpc, self.endpoints.metrics)
        return server_argv(self.repo, self.layout, ports, str(self.binary), address="127.0.0.1")

    def env(self) -> dict[str, str]:
        return os.environ.copy()
