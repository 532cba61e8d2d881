"""A server process kiln starts on loopback ports and always stops: the base of every stack's server.

A subclass gives its command; the defaults suit a server with one HTTP port that is ready when /health
answers, in kiln's environment (vLLM's OpenAI server, a stack's own). kiln.serve.triton.TritonServer adds
Triton's three ports, its readiness URL and the python-backend watch.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kiln.common.errors import KilnError, UserInputError
from kiln.common.processes import wait_until_ready


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


class ServerProcess:
    """A server process on loopback ports; a context manager that always stops it (and its process group)."""

    what = "server"

    def __init__(self, home: Path, endpoints: Endpoints | None = None, log_path: Path | None = None):
        self.home = Path(home)
        self.endpoints = endpoints or Endpoints(free_port(), free_port(), free_port())
        self.log_path = log_path or self.home / "logs" / "server.log"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return os.environ.copy()

    def listening(self) -> tuple[tuple[str, int], ...]:
        return (("HTTP", self.endpoints.http),)

    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.endpoints.http}/health"

    def before_start(self) -> None:
        """What must listen before the process starts (Triton's HTTP gate)."""

    def after_ready(self) -> None:
        """What watches the process once it answers (Triton's python-backend workers)."""

    def before_stop(self) -> None:
        """Undo before_start and after_ready."""

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

    def start(self, timeout_s: float = 180, progress=None) -> "ServerProcess":
        self._refuse_taken_ports()
        self.before_start()
        command = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        # Its own process group: its workers are its children and must go when it goes.
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                        start_new_session=True)
        log.close()
        state = wait_until_ready(self.process, self.ready_url(), timeout_s)
        if state == "ready" and self.process.poll() is None:   # ready, and from the process kiln started
            self.after_ready()
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
        """SIGTERM (the server unloads its models and exits), then SIGKILL for whatever is left of the group."""
        self.before_stop()
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()  # the server only: it stops its own workers
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # workers that outlived the server
        except ProcessLookupError:
            pass
        self.process.wait()
        return self.process.returncode

    def __enter__(self) -> "ServerProcess":
        return self if self.process is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
