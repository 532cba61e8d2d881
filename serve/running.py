"""The serve stage's front door: an artifact from the registry, served by a tritonserver that is ready.

    with start_server(home, "demo-fp8@candidate", "cpu", progress) as running:
        print(running.endpoints.describe(), running.ask("def f(x):", max_tokens=16))

start_server pulls the artifact (verified), writes its repository in this process's scratch folder,
starts the server on loopback ports and returns once the server kiln started answers ready. Leaving
the block (or stop()) stops the server and every python stub, and removes the repository.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kiln.common.scratch import LOGS, process_scratch, reclaim_dead
from kiln.serve.repository import write_repository
from kiln.serve.stack import Repository, ServeFlags
from kiln.serve.stacks import stack_named
from kiln.serve.server import Endpoints, ServerProcess, free_port


@dataclass
class RunningServer:
    repo: Repository
    server: ServerProcess
    scratch: Path

    @property
    def endpoints(self) -> Endpoints:
        return self.server.endpoints

    def ask(self, prompt: str, max_tokens: int) -> str:
        """One completion, as the stack's server takes it (gRPC, HTTP generate, OpenAI completions)."""
        return stack_named(self.repo.stack).ask(self.repo, self.endpoints, prompt, max_tokens)

    def serving_lines(self) -> list[str]:
        return stack_named(self.repo.stack).serving_lines(self.repo, self.endpoints)

    def stop(self) -> int | None:
        """Stop the server and its stubs, remove the repository; the server's exit code."""
        try:
            return self.server.stop()
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(home: Path, ref: str, stack_name: str, progress, ports: tuple[int, int, int] = (8000, 8001, 8002),
                 flags: ServeFlags = ServeFlags(), host=None) -> RunningServer:
    """Serve `ref` with the stack `stack_name` (cpu | gpu | vllm) on 127.0.0.1 `ports` (HTTP, gRPC, metrics; 0: any
    free one; vLLM's server takes the HTTP port only).

    A stack serving engines (gpu) serves this host's SM only and refuses, before downloading, engines the
    version lacks for it or that another TensorRT built. `host` (kiln.compile.detect_host()) for such a stack.
    """
    stack = stack_named(stack_name)
    sm, tensorrt = stack.host_engines(home, ref, host)
    reclaim_dead(home)
    scratch = Path(tempfile.mkdtemp(prefix="kiln-serve-", dir=process_scratch(home)))
    try:
        repo = write_repository(home, ref, scratch / "repository", stack_name, progress, flags, sm=sm,
                                installed_tensorrt=tensorrt)
        endpoints = Endpoints(*(port or free_port() for port in ports))
        # The log outlives the scratch folder: a failed start's message points at it.
        server = stack.server(repo, home, endpoints, Path(home) / LOGS / f"{stack.log_name}-{endpoints.http}.log")
        with progress.task(f"start {server.what} for {repo.name}/{repo.version}", total=None):
            server.start(timeout_s=stack.start_timeout_s)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return RunningServer(repo, server, scratch)
