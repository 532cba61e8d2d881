"""Start and stop a real `tritonserver` on 127.0.0.1: the one nvidia-pytriton ships (CPU, python backend).

The python backend's stub is a binary that links the system libpython and imports numpy and
kiln from this environment: kiln hands it the running interpreter's lib directory and the
wheel's bundled libraries on LD_LIBRARY_PATH, and this environment's bin first on PATH.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from kiln.common.errors import KilnError
from kiln.common.fsutil import build_once
from kiln.serve.http_gate import HttpGate
from kiln.serve.server import Endpoints, ServerProcess, free_port
from kiln.serve.workers import WorkerWatch


def pytriton_server_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")
    server = Path(spec.submodule_search_locations[0]) / "tritonserver" if spec else None
    if server is None or not (server / "bin" / "tritonserver").is_file():
        raise KilnError("no tritonserver for the CPU runtime: it comes with nvidia-pytriton "
                        "(fix: `make venv`, or `pip install --no-deps nvidia-pytriton==0.7.0`)")
    return server


def _backend_directory(server: Path, home: Path) -> Path:
    """A backend directory whose python backend carries the stub built for this Python version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise KilnError(f"nvidia-pytriton ships no python backend stub for Python {version} (it has "
                        f"{', '.join(sorted(p.name for p in (server / 'python_backend_stubs').iterdir()))})")
    def fill(staging: Path) -> None:
        shutil.copytree(server / "backends", staging, symlinks=True, dirs_exist_ok=True)
        shutil.copy2(stub, staging / "python" / "triton_python_backend_stub")

    # Built once per home and Python version; a server may already be running from it.
    return build_once(Path(home) / "triton" / f"backends-py{version}", fill,
                      done=lambda backends: (backends / "python" / "triton_python_backend_stub").is_file())


def _server_env(server: Path) -> dict[str, str]:
    env = os.environ.copy()
    libs = [sysconfig.get_config_var("LIBDIR"), str(server.parent.parent / "nvidia_pytriton.libs"),
            str(server / "external_libs"), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


class TritonServer(ServerProcess):
    """A tritonserver process on loopback ports (HTTP, gRPC, metrics)."""

    what = "tritonserver"
    watch_workers = True   # python-backend stubs: reload a model whose stub died (kiln.serve.workers)

    def __init__(self, repo: Path, home: Path, models: tuple[str, ...], endpoints: Endpoints | None = None,
                 log_path: Path | None = None, http_body_limit: tuple[int, str] | None = None):
        super().__init__(home, endpoints, log_path or Path(home) / "triton" / "tritonserver.log")
        self.repo, self.models = Path(repo), models
        self.watch: WorkerWatch | None = None
        # (bytes, why): Triton listens on a private port behind kiln's HTTP gate (kiln.serve.http_gate).
        self.http_body_limit = http_body_limit
        self.triton_http = free_port() if http_body_limit else self.endpoints.http
        self.gate: HttpGate | None = None

    def command(self) -> list[str]:
        server = pytriton_server_dir()
        return [
            str(server / "bin" / "tritonserver"),
            "--model-repository", str(self.repo),
            "--backend-directory", str(_backend_directory(server, self.home)),
            "--http-address", "127.0.0.1", "--http-port", str(self.triton_http),
            "--grpc-address", "127.0.0.1", "--grpc-port", str(self.endpoints.grpc),
            "--metrics-address", "127.0.0.1", "--metrics-port", str(self.endpoints.metrics),
            "--allow-metrics", "true", "--log-verbose", "0",
            # Load exactly kiln's models (the artifact folder beside them is not a model) and
            # give in-flight requests 5 s on shutdown instead of the default 30.
            "--model-control-mode", "explicit", *(f"--load-model={m}" for m in self.models),
            "--exit-timeout-secs", "5",
        ]

    def env(self) -> dict[str, str]:
        return _server_env(pytriton_server_dir())

    def listening(self) -> tuple[tuple[str, int], ...]:
        return (("HTTP", self.endpoints.http), ("gRPC", self.endpoints.grpc), ("metrics", self.endpoints.metrics))

    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.endpoints.http}/v2/health/ready"

    def before_start(self) -> None:
        if self.http_body_limit is not None:
            self.gate = HttpGate(self.endpoints.http, self.triton_http, *self.http_body_limit).start()

    def after_ready(self) -> None:
        if self.watch_workers:
            self.watch = WorkerWatch(self.process.pid, self.endpoints.http).start()

    def before_stop(self) -> None:
        if self.gate is not None:
            self.gate.stop()
        if self.watch is not None:
            self.watch.stop()
