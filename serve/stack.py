"""What a serving stack is: the server kiln writes a repository for and starts (`--stack cpu | gpu | vllm`).

Not to be confused with the recipe's runtimes (`trtllm | trtllm-pytorch | vllm | sglang`), which say who
loads a checkpoint (kiln.quantize.Runtime). A stack is one subclass of `Stack`, registered
by name in kiln.serve.stacks.STACKS: adding SGLang is its module plus a row there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kiln.serve.server import Endpoints, ServerProcess


@dataclass(frozen=True)
class ServeFlags:
    """`kiln serve` and `kiln triton-repo` settings; each stack reads the ones that apply to it."""

    templates: Path | None = None      # gpu: TensorRT-LLM's triton_backend/all_models
    decoupled: bool = False            # gpu: streaming responses
    max_batch_size: int = 8            # cpu: Triton max_batch_size
    max_queue_delay_us: int = 1000     # dynamic batching
    max_queue_size: int = 0            # gpu: 0 is unbounded
    instances: int = 1
    max_tokens: int = 64               # cpu: tokens generated when a request names none
    container: str | None = None       # gpu, vllm: the image in the printed `docker run` (None: the stack's own)


@dataclass(frozen=True)
class Repository:
    path: Path
    name: str
    version: str
    stack: str                   # the stack's name
    models: tuple[str, ...]
    entry_model: str             # the model a client sends text to
    stream_model: str | None     # the decoupled model for token streaming (gRPC)
    sm: str | None = None
    gpu_layout: object | None = None    # gpu: its GpuLayout
    container_command: str | None = None
    http_body_limit: int | None = None  # cpu: the largest request body kiln's HTTP gate lets through to Triton


class Stack:
    """A serving stack: subclass it, set the attributes, implement write, server, ask, written_lines and
    serving_lines. The defaults suit a stack that serves the checkpoint in kiln's own Python."""

    name: str
    start_timeout_s: int         # how long its server may take to answer ready
    log_name: str                # its server log's name under $KILN_HOME/logs
    pulls_engines = False        # it serves one SM's engines (the pull takes that SM; needs --gpu or this host's GPU)

    def host_engines(self, home: Path, ref: str, host) -> tuple[str | None, str | None]:
        """(SM, installed TensorRT) whose engines this host serves, refused before any download; (None, None)
        for a stack that serves the checkpoint."""
        return None, None

    def write(self, staging: Path, artifact: Path, registered: str, final_root: Path, flags: ServeFlags,
              sm: str | None) -> dict:
        """Lay out its models in `staging` beside the pulled `artifact` (naming files as they will be under
        `final_root`); the Repository fields it decides (models, entry_model, ...)."""
        raise NotImplementedError

    def server(self, repo: Repository, home: Path, endpoints: Endpoints, log: Path) -> ServerProcess:
        """The process that serves `repo` (not started)."""
        raise NotImplementedError

    def ask(self, repo: Repository, endpoints: Endpoints, prompt: str, max_tokens: int) -> str:
        """One completion from the running server."""
        raise NotImplementedError

    def interpreter(self) -> tuple[str, dict] | None:
        """(tool, {python, env, version}) for `kiln doctor` where the stack runs in a Python of its own."""
        return None

    def written_lines(self, repo: Repository, ref: str) -> list[str]:
        """What `kiln triton-repo` prints after writing: how to start it."""
        raise NotImplementedError

    def serving_lines(self, repo: Repository, endpoints: Endpoints) -> list[str]:
        """What `kiln serve` prints once the server is ready."""
        raise NotImplementedError


def triton_serving_lines(repo: Repository, endpoints: Endpoints) -> list[str]:
    """`kiln serve`'s lines for a tritonserver: where it listens and which models to ask."""
    where = f", {repo.sm}" if repo.sm else ""
    streaming = f", {repo.stream_model} (gRPC streaming, stream=true)" if repo.stream_model else ""
    return [f"serving {repo.name}/{repo.version} ({repo.stack}{where}): {endpoints.describe()}",
            f"models: {repo.entry_model} (one response per request){streaming}"]
