"""The CPU layout: one decoupled python-backend model serving a kiln artifact with the reference runtime."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from kiln.common.errors import UserInputError
from kiln.serve.pbtxt import set_parameters, tensor, write_config
from kiln.serve.http_gate import TRITON_BODY_CAP
from kiln.serve.requests import Limits, artifact_limits, max_prompt_bytes
from kiln.serve.stack import Repository, ServeFlags, Stack, triton_serving_lines
from kiln.serve.server import Endpoints
from kiln.serve.triton import TritonServer

CPU_MODEL = "kiln_llm"                  # one response per request: HTTP and gRPC infer
CPU_STREAM_MODEL = "kiln_llm_stream"    # decoupled: one response per token over gRPC streaming
ARTIFACT_DIR = "artifact"               # beside the models, shared by both
_MODEL_SOURCE = Path(__file__).parent / "cpu_model" / "model.py"


@dataclass(frozen=True)
class CpuServeOptions:
    max_batch_size: int = 8
    max_queue_delay_microseconds: int = 1000
    instances: int = 1
    default_max_tokens: int = 64
    trust_remote_code: bool = False


def cpu_model_config(name: str, options: CpuServeOptions, limits: Limits) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=options.max_batch_size)
    tensor(config.input, "text_input", "BYTES", [1])
    tensor(config.input, "max_tokens", "INT32", [1], optional=True)
    tensor(config.output, "text_output", "BYTES", [1])
    tensor(config.output, "output_ids", "INT32", [-1])
    if name == CPU_STREAM_MODEL:
        tensor(config.input, "stream", "BOOL", [1], optional=True)
        config.model_transaction_policy.decoupled = True
    config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_microseconds
    group = config.instance_group.add()
    group.count, group.kind = options.instances, mc.ModelInstanceGroup.KIND_CPU
    set_parameters(config, {"artifact": f"../{ARTIFACT_DIR}", **limits.as_parameters(),
                            "trust_remote_code": "true" if options.trust_remote_code else "false"})
    return config


def write_cpu_repository(repo: Path, options: CpuServeOptions) -> tuple[str, ...]:
    """Both models around the pulled artifact at <repo>/artifact/; returns the model names."""
    if not (Path(repo) / ARTIFACT_DIR / "hf").is_dir():
        raise FileNotFoundError(f"{repo}/{ARTIFACT_DIR}/hf: pull the artifact there first")
    # The artifact's own limits: a request past them would hold the only instance for minutes.
    limits = artifact_limits(Path(repo) / ARTIFACT_DIR, options.default_max_tokens)
    for name in (CPU_MODEL, CPU_STREAM_MODEL):
        (Path(repo) / name / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_MODEL_SOURCE, Path(repo) / name / "1" / "model.py")
        write_config(cpu_model_config(name, options, limits), Path(repo) / name)
    return (CPU_MODEL, CPU_STREAM_MODEL)


def http_body_limit(artifact: Path, options: CpuServeOptions) -> int:
    """The largest HTTP request body the artifact can accept: a full batch of the longest prompts its
    build.max_input_len admits, each JSON-escaped at worst (6 bytes a byte: \\u0001), plus room for the rest of
    the request; never more than kiln's HTTP gate lets reach Triton 2.51 (kiln.serve.http_gate)."""
    from transformers import AutoTokenizer

    limits = artifact_limits(artifact, options.default_max_tokens)
    tokenizer = AutoTokenizer.from_pretrained(Path(artifact) / "hf", trust_remote_code=options.trust_remote_code)
    prompt = max_prompt_bytes(tokenizer, limits.max_input_len)
    return min(TRITON_BODY_CAP, options.max_batch_size * prompt * 6 + (64 << 10))


class CpuStack(Stack):
    """kiln's reference runtime in Triton's python backend (nvidia-pytriton's tritonserver): any artifact,
    any host."""

    name = "cpu"
    start_timeout_s = 180
    log_name = "tritonserver"

    def write(self, staging: Path, artifact: Path, registered: str, final_root: Path, flags: ServeFlags,
              sm: str | None) -> dict:
        options = CpuServeOptions(max_batch_size=flags.max_batch_size,
                                  max_queue_delay_microseconds=flags.max_queue_delay_us, instances=flags.instances,
                                  default_max_tokens=flags.max_tokens)
        return {"models": write_cpu_repository(staging, options), "entry_model": CPU_MODEL,
                "stream_model": CPU_STREAM_MODEL, "http_body_limit": http_body_limit(artifact, options)}

    def server(self, repo: Repository, home: Path, endpoints: Endpoints, log: Path) -> TritonServer:
        limit = repo.http_body_limit
        why = "kiln serve takes at most a full batch of prompts within the artifact's build.max_input_len"
        return TritonServer(repo.path, home, repo.models, endpoints, log_path=log,
                            http_body_limit=(limit, why) if limit else None)

    def ask(self, repo: Repository, endpoints: Endpoints, prompt: str, max_tokens: int) -> str:
        """Over gRPC, with the model's own refusal of a request past its limits as one line."""
        import numpy as np
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        with grpcclient.InferenceServerClient(f"127.0.0.1:{endpoints.grpc}") as client:
            text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
            text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
            limit = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
            limit.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
            try:
                result = client.infer(repo.entry_model, [text, limit])
            except InferenceServerException as exc:
                if exc.status() != "StatusCode.INVALID_ARGUMENT":
                    raise
                # The model's own message names the limit (build.max_input_len / max_seq_len) and the value.
                raise UserInputError(f"--prompt/--max-tokens: the model refused the request: {exc.message()}") from None
        return result.as_numpy("text_output")[0][0].decode()

    def written_lines(self, repo: Repository, ref: str) -> list[str]:
        loads = " ".join("--load-model=" + m for m in repo.models)
        return [f"start it with: kiln serve {ref} --stack {self.name}   (or tritonserver --model-repository "
                f"{repo.path} --model-control-mode explicit {loads})"]

    def serving_lines(self, repo: Repository, endpoints: Endpoints) -> list[str]:
        return triton_serving_lines(repo, endpoints)
