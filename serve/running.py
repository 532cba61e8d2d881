"""The serve stage's front door: an artifact from the registry, served by a tritonserver that is ready.

    with start_server(home, "demo-fp8@candidate", "cpu", progress) as running:
        print(running.endpoints.describe(), running.ask("def f(x):", max_tokens=16))

start_server pulls the artifact (verified), writes its repository in this process's scratch folder,
starts the server on loopback ports and returns once the server kiln started answers ready. Leaving
the block (or stop()) stops the server and every python stub, and removes the repository.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kiln.common.errors import UserInputError
from kiln.common.scratch import LOGS, process_scratch, reclaim_dead
from kiln.serve.cpu_repo import CpuServeOptions
from kiln.serve.gpu_repo import GpuServeOptions
from kiln.serve.repository import Repository, write_repository
from kiln.serve.triton import Endpoints, TritonServer, TrtllmTritonServer, free_port, trtllm_tritonserver
from kiln.serve.vllm_server import VllmServer, ask_vllm, vllm_python

START_TIMEOUT_S = {"cpu": 180, "gpu": 1800, "vllm": 900}   # a GPU server loads engines of tens of GB


@dataclass
class RunningServer:
    repo: Repository
    server: TritonServer
    scratch: Path

    @property
    def endpoints(self) -> Endpoints:
        return self.server.endpoints

    def ask(self, prompt: str, max_tokens: int) -> str:
        """One completion: over gRPC from the CPU model, over HTTP generate from TensorRT-LLM's ensemble, from
        vLLM's OpenAI-compatible completions."""
        if self.repo.runtime == "vllm":
            return ask_vllm(self.endpoints, self.repo.entry_model, prompt, max_tokens)
        if self.repo.gpu_layout is None:
            return _ask_cpu(self.endpoints, self.repo.entry_model, prompt, max_tokens)
        return _ask_gpu(self.endpoints, self.repo, prompt, max_tokens)

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


def start_server(home: Path, ref: str, runtime: str, progress, ports: tuple[int, int, int] = (8000, 8001, 8002),
                 cpu_options: CpuServeOptions = CpuServeOptions(), gpu_options: GpuServeOptions = GpuServeOptions(),
                 host=None) -> RunningServer:
    """Serve `ref` with `runtime` (cpu | gpu | vllm) on 127.0.0.1 `ports` (HTTP, gRPC, metrics; 0: any free one;
    vLLM's server takes the HTTP port only).

    The GPU runtime serves this host's SM only and refuses, before downloading, engines the version
    lacks for it or that another TensorRT built. `host` (kiln.compile.detect_host()) for the GPU runtime.
    """
    sm, tensorrt = None, None
    if runtime == "gpu":
        sm, tensorrt = _gpu_host(home, ref, host)
    reclaim_dead(home)
    scratch = Path(tempfile.mkdtemp(prefix="kiln-serve-", dir=process_scratch(home)))
    try:
        repo = write_repository(home, ref, scratch / "repository", runtime, progress, cpu_options, gpu_options,
                                sm=sm, installed_tensorrt=tensorrt)
        endpoints = Endpoints(*(port or free_port() for port in ports))
        # The log outlives the scratch folder: a failed start's message points at it.
        log = Path(home) / LOGS / f"{'vllm' if runtime == 'vllm' else 'tritonserver'}-{endpoints.http}.log"
        if runtime == "vllm":
            from kiln.validate import vllm_build

            vllm_python()   # refused, with the fix, before anything starts
            server = VllmServer(repo.path, home, repo.entry_model, endpoints, log,
                                on_gpu=not vllm_build().startswith("cpu:"))
        elif repo.gpu_layout is None:
            server = TritonServer(repo.path, home, repo.models, endpoints, log_path=log)
        else:
            binary = trtllm_tritonserver(target_needs_backend=repo.gpu_layout.disable_auto_complete)
            server = TrtllmTritonServer(repo.path, home, repo.gpu_layout, binary, endpoints, log_path=log)
        with progress.task(f"start {server.what} for {repo.name}/{repo.version}", total=None):
            server.start(timeout_s=START_TIMEOUT_S[runtime])
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return RunningServer(repo, server, scratch)


def _gpu_host(home: Path, ref: str, host) -> tuple[str, str | None]:
    from kiln.registry import check_pullable

    if host is None or not host.sms:
        raise UserInputError("--runtime gpu: this host has no NVIDIA GPU (fix: --runtime cpu, or prepare a "
                             "repository for a GPU host with `kiln triton-repo REF --runtime gpu --gpu sm90 "
                             "--templates DIR`)")
    sm, tensorrt = host.sms[0], host.tensorrt
    check_pullable(home, ref, sm, tensorrt)   # before gigabytes of engines are downloaded
    trtllm_tritonserver(target_needs_backend=False)
    return sm, tensorrt


def _ask_cpu(endpoints: Endpoints, model: str, prompt: str, max_tokens: int) -> str:
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with grpcclient.InferenceServerClient(f"127.0.0.1:{endpoints.grpc}") as client:
        text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
        limit = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
        limit.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
        try:
            result = client.infer(model, [text, limit])
        except InferenceServerException as exc:
            if exc.status() != "StatusCode.INVALID_ARGUMENT":
                raise
            # The model's own message names the limit (build.max_input_len / max_seq_len) and the value.
            raise UserInputError(f"--prompt/--max-tokens: the model refused the request: {exc.message()}") from None
    return result.as_numpy("text_output")[0][0].decode()


def _ask_gpu(endpoints: Endpoints, repo: Repository, prompt: str, max_tokens: int) -> str:
    """The GPU layouts' generate endpoint, as NVIDIA's docs call it."""
    body = json.dumps({"text_input": prompt, repo.gpu_layout.max_tokens_input: max_tokens}).encode()
    url = f"http://127.0.0.1:{endpoints.http}/v2/models/{repo.entry_model}/generate"
    with urllib.request.urlopen(urllib.request.Request(url, body, method="POST"), timeout=600) as answer:
        text = json.loads(answer.read())["text_output"]
    return text[0] if isinstance(text, list) else text
