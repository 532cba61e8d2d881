"""Start and stop a real `tritonserver` on 127.0.0.1: the one nvidia-pytriton ships (CPU, python backend).

The python backend's stub is a binary that links the system libpython and imports numpy and
kiln from this environment: kiln hands it the running interpreter's lib directory and the
wheel's bundled libraries on LD_LIBRARY_PATH, and this environment's bin first on PATH.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from kiln.common.errors import KilnError, UserInputError
from kiln.common.fsutil import build_once
from kiln.common.processes import wait_until_ready
from kiln.serve.http_gate import HttpGate
from kiln.serve.workers import WorkerWatch


@dataclass(frozen=True)
class Endpoints:
    http: int
    grpc: int
    metrics: int

    def describe(self) -> str:
        return (f"HTTP http://127.0.0.1:{self.http}  gRPC 127.0.0.1:{self.grpc}  "
                f"metrics http://127.0.0.1:{self.metrics}/metrics")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


class TritonServer:
    """A tritonserver process on loopback ports; a context manager that always stops it."""

    what = "tritonserver"
    watch_workers = True   # python-backend stubs: reload a model whose stub died (kiln.serve.workers)

    def __init__(self, repo: Path, home: Path, models: tuple[str, ...], endpoints: Endpoints | None = None,
                 log_path: Path | None = None, http_body_limit: tuple[int, str] | None = None):
        self.repo, self.home, self.models = Path(repo), Path(home), models
        self.endpoints = endpoints or Endpoints(free_port(), free_port(), free_port())
        self.log_path = log_path or self.home / "triton" / "tritonserver.log"
        self.process: subprocess.Popen | None = None
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

    def _refuse_taken_ports(self) -> None:
        """A port something else listens on would answer the readiness probe for a server that never bound it."""
        for what, port in self.listening():
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError as exc:
                    raise UserInputError(f"the {what} port 127.0.0.1:{port} is taken ({exc.strerror}) (fix: stop "
                                         f"what listens there, or pass --{what.lower()}-port 0 for any free port)") from None

    def start(self, timeout_s: float = 180, progress=None) -> "TritonServer":
        self._refuse_taken_ports()
        if self.http_body_limit is not None:
            self.gate = HttpGate(self.endpoints.http, self.triton_http, *self.http_body_limit).start()
        command = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        # Its own process group: the python stubs are its children and must go when it goes.
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                        start_new_session=True)
        log.close()
        state = wait_until_ready(self.process, self.ready_url(), timeout_s)
        if state == "ready" and self.process.poll() is None:   # ready, and from the process kiln started
            if self.watch_workers:
                self.watch = WorkerWatch(self.process.pid, self.endpoints.http).start()
            return self
        if state == "ready":
            state = "exited"
        if state == "exited":
            raise KilnError(f"{self.what} exited {self.process.returncode} while starting; "
                            f"last lines:\n  {self._log_tail()}\n  full log: {self.log_path}")
        self.stop()
        raise KilnError(f"{self.what} was not ready after {timeout_s:.0f} s; last lines:\n  {self._log_tail()}"
                        f"\n  full log: {self.log_path}")

    def _log_tail(self, lines: int = 6) -> str:
        try:
            return "\n  ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 30) -> int | None:
        """SIGTERM (Triton unloads models and exits), then SIGKILL for whatever is left of the group."""
        if self.gate is not None:
            self.gate.stop()
        if self.process is None:
            return None
        if self.watch is not None:
            self.watch.stop()
        if self.process.poll() is None:
            self.process.terminate()  # the server only: it unloads its models and stops their stubs
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # stubs that outlived the server
        except ProcessLookupError:
            pass
        self.process.wait()
        return self.process.returncode

    def __enter__(self) -> "TritonServer":
        return self if self.process is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class HttpServer(TritonServer):
    """A server that is not tritonserver: one HTTP port, ready when /health answers, in kiln's environment
    (vLLM's OpenAI server; a stack's own server). Subclasses give its command."""

    watch_workers = False

    def env(self) -> dict[str, str]:
        return os.environ.copy()

    def listening(self) -> tuple[tuple[str, int], ...]:
        return (("HTTP", self.endpoints.http),)

    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.endpoints.http}/health"
