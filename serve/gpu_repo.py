"""The GPU layouts: TensorRT-LLM's own Triton models, filled with one artifact's values.

  trtllm-engine   inflight_batcher_llm: ensemble, preprocessing, tensorrt_llm (C++ backend),
                  postprocessing, tensorrt_llm_bls; every config.pbtxt filled and parsed
  trtllm-pytorch  llmapi: one python model whose 1/model.yaml holds the LLM-API options

Both sit beside the pulled artifact at <repo>/artifact/ and name it by absolute path (the
tokenizer and engine paths are the backend's own parameters), so the server must see the
repository at the same path: the printed `docker run` mounts it there.
Parameter names and which are mandatory: tensorrtllm_backend docs/model_config.md.
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from kiln.compile import ENGINE_RECORD, LLM_API_OPTIONS, Target, load_record, sm_folder
from kiln.common.errors import UserInputError
from kiln.common.fsutil import atomic_write_text
from kiln.quantize import HF_DIR
from kiln.serve.pbtxt import write_config
from kiln.serve.stack import Repository, ServeFlags, Stack, triton_serving_lines
from kiln.serve.templates import TemplateError, fill_config
from kiln.serve.server import Endpoints
from kiln.serve.triton import TritonServer
from kiln.serve.trtllm_server import TrtllmTritonServer, server_argv, trtllm_tritonserver

ENGINE_LAYOUT = "inflight_batcher_llm"
LLMAPI_LAYOUT = "llmapi"
ENGINE_MODELS = ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing", "tensorrt_llm_bls")
LLMAPI_MODEL = "tensorrt_llm"
CONTAINER = "nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3"

# Mandatory parameters per model (docs/model_config.md); anything else kiln lacks is dropped.
MANDATORY = {
    "ensemble": frozenset({"triton_max_batch_size", "logits_datatype"}),
    "preprocessing": frozenset({"triton_max_batch_size", "tokenizer_dir", "preprocessing_instance_count",
                                "max_queue_delay_microseconds", "max_queue_size"}),
    "tensorrt_llm": frozenset({"triton_backend", "triton_max_batch_size", "decoupled_mode",
                               "max_queue_delay_microseconds", "max_queue_size", "engine_dir", "batching_strategy",
                               "encoder_input_features_data_type", "logits_datatype"}),
    "postprocessing": frozenset({"triton_max_batch_size", "tokenizer_dir", "postprocessing_instance_count"}),
    "tensorrt_llm_bls": frozenset({"triton_max_batch_size", "decoupled_mode", "bls_instance_count",
                                   "logits_datatype"}),
}
# TensorRT-LLM dtype names (engine config.json) -> Triton data types.
_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}


@dataclass(frozen=True)
class GpuServeOptions:
    templates: Path | None = None           # TensorRT-LLM's triton_backend/all_models
    decoupled: bool = False                 # streaming responses (gRPC stream, HTTP generate_stream)
    instances: int = 1                      # pre/postprocessing and BLS instances
    max_queue_delay_microseconds: int = 1000
    max_queue_size: int = 0                 # 0: unbounded
    container: str = CONTAINER


@dataclass(frozen=True)
class GpuLayout:
    models: tuple[str, ...]
    entry_model: str
    stream_model: str | None
    world_size: int                         # tritonserver processes under mpirun: the engine's TP size
    target: Target
    tensorrt_llm: str | None
    dropped: dict[str, tuple[str, ...]] = field(default_factory=dict)
    disable_auto_complete: bool = True
    max_tokens_input: str = "max_tokens"    # the entry model's input for the number of new tokens


def _layout_source(templates: Path | None, layout: str, models: tuple[str, ...], tensorrt_llm: str | None) -> Path:
    release = f"v{tensorrt_llm}" if tensorrt_llm else "<the release that built the artifact>"
    fix = (f"git clone --depth 1 --branch {release} https://github.com/NVIDIA/TensorRT-LLM, then "
           "--templates TensorRT-LLM/triton_backend/all_models (or set KILN_TRTLLM_TEMPLATES)")
    if templates is None:
        raise UserInputError(f"--templates: the GPU layouts are TensorRT-LLM's own Triton models, and kiln needs "
                             f"the ones of TensorRT-LLM {tensorrt_llm or '(unknown)'} (fix: {fix})")
    for candidate in (Path(templates) / layout, Path(templates)):
        if all((candidate / model / "config.pbtxt").is_file() for model in models):
            return candidate
    raise UserInputError(f"--templates {templates}: no {layout} models there (expected {', '.join(models)} with a "
                         f"config.pbtxt each) (fix: {fix})")


def _engine_values(repo: Path, root: Path, sm: str, options: GpuServeOptions) -> tuple[dict[str, str], int]:
    """What kiln knows for the engine layout's placeholders: from the engine, its record and the options."""
    sm_dir = repo / "artifact" / sm_folder(sm)
    engine = json.loads((sm_dir / "config.json").read_text())
    build, pretrained = engine.get("build_config", {}), engine.get("pretrained_config", {})
    request = load_record(sm_dir)["request"]
    as_bool = {True: "true", False: "false"}
    values = {
        "triton_backend": "tensorrtllm",
        "triton_max_batch_size": str(build["max_batch_size"]),
        "max_beam_width": str(build.get("max_beam_width", 1)),
        "decoupled_mode": as_bool[options.decoupled],
        "batching_strategy": "inflight_fused_batching",
        "engine_dir": str(root / "artifact" / sm_folder(sm)),
        "tokenizer_dir": str(root / "artifact" / HF_DIR),
        "kv_cache_free_gpu_mem_fraction": str(request["free_gpu_memory_fraction"]),
        "enable_kv_cache_reuse": as_bool[bool(request["kv_cache_reuse"])],
        "max_queue_delay_microseconds": str(options.max_queue_delay_microseconds),
        "max_queue_size": str(options.max_queue_size),
        "preprocessing_instance_count": str(options.instances),
        "postprocessing_instance_count": str(options.instances),
        "bls_instance_count": str(options.instances),
        "logits_datatype": _TRITON_TYPES[pretrained.get("logits_dtype", "float32")],
        # Only encoder-decoder and multimodal models feed these inputs; the backend still needs a type.
        "encoder_input_features_data_type": "TYPE_FP16",
        "prompt_embedding_table_data_type": _TRITON_TYPES[pretrained.get("dtype", "float16")],
        "tensorrt_llm_model_name": "tensorrt_llm",
        "exclude_input_in_output": "true",     # completions carry the new text only
        "accumulate_tokens": "false",
    }
    world_size = int(pretrained.get("mapping", {}).get("world_size", request["tp_size"]))
    return values, world_size


def write_engine_layout(repo: Path, root: Path, sm: str, options: GpuServeOptions,
                        tensorrt_llm: str | None) -> GpuLayout:
    source = _layout_source(options.templates, ENGINE_LAYOUT, ENGINE_MODELS, tensorrt_llm)
    values, world_size = _engine_values(repo, root, sm, options)
    dropped = {}
    for model in ENGINE_MODELS:
        filled = fill_config(source / model / "config.pbtxt", values, MANDATORY[model])
        if filled.config.name != model:
            raise TemplateError(f"{source / model / 'config.pbtxt'}: names model '{filled.config.name}', "
                                f"not '{model}'")
        _copy_model(source / model, repo / model)
        write_config(filled.config, repo / model)
        dropped[model] = filled.dropped
    return GpuLayout(ENGINE_MODELS, "ensemble", "ensemble" if options.decoupled else None, world_size,
                     Target.trtllm_engine, tensorrt_llm, dropped)


def write_llmapi_layout(repo: Path, root: Path, sm: str, options: GpuServeOptions,
                        tensorrt_llm: str | None) -> GpuLayout:
    """The llmapi model: its config.pbtxt as released, model.yaml = the artifact's LLM-API options."""
    source = _layout_source(options.templates, LLMAPI_LAYOUT, (LLMAPI_MODEL,), tensorrt_llm)
    filled = fill_config(source / LLMAPI_MODEL / "config.pbtxt", {})
    template_yaml = source / LLMAPI_MODEL / "1" / "model.yaml"
    if not template_yaml.is_file():
        raise UserInputError(f"--templates {options.templates}: {template_yaml} is missing")
    released = yaml.safe_load(template_yaml.read_text()) or {}
    artifact_options = yaml.safe_load((repo / "artifact" / sm_folder(sm) / LLM_API_OPTIONS).read_text())
    model_yaml = {
        **{k: v for k, v in released.items() if k not in ("model", "triton_config")},
        "model": str(root / "artifact" / HF_DIR),
        "backend": "pytorch",
        **artifact_options,
        # The llmapi model batches in flight inside the LLM; Triton's own batching stays as released.
        "triton_config": {**(released.get("triton_config") or {}), "decoupled": options.decoupled},
    }
    _copy_model(source / LLMAPI_MODEL, repo / LLMAPI_MODEL)
    write_config(filled.config, repo / LLMAPI_MODEL)
    atomic_write_text(repo / LLMAPI_MODEL / "1" / "model.yaml", yaml.safe_dump(model_yaml, sort_keys=False))
    return GpuLayout((LLMAPI_MODEL,), LLMAPI_MODEL, LLMAPI_MODEL if options.decoupled else None, 1,
                     Target.trtllm_pytorch, tensorrt_llm, {LLMAPI_MODEL: filled.dropped},
                     disable_auto_complete=False,   # its model.py sets batching and decoupling from model.yaml
                     max_tokens_input="sampling_param_max_tokens")


def _copy_model(source: Path, dest: Path) -> None:
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("config.pbtxt", "__pycache__", "*.pyc", ".gitkeep"))
    (dest / "1").mkdir(exist_ok=True)      # Triton wants a version folder, even an ensemble's


LAYOUTS: dict[Target, Callable[[Path, Path, str, GpuServeOptions, str | None], GpuLayout]] = {
    Target.trtllm_engine: write_engine_layout,
    Target.trtllm_pytorch: write_llmapi_layout,
}


def write_gpu_layout(repo: Path, sm: str, options: GpuServeOptions, final_root: Path | None = None) -> GpuLayout:
    """The layout for the target the artifact's `sm` folder was compiled for (its engine.json says).

    Written into `repo`; the configs name files by their path under `final_root` (default: `repo`),
    where the repository will be once its atomic write completes.
    """
    record_path = repo / "artifact" / sm_folder(sm) / ENGINE_RECORD
    record = json.loads(record_path.read_text())
    return LAYOUTS[Target(record["target"])](repo, Path(final_root or repo), sm, options, record.get("tensorrt_llm"))


def docker_command(repo: Path, layout: GpuLayout, container: str, ports=(8000, 8001, 8002)) -> str:
    """The `docker run` that serves this repository in NVIDIA's TensorRT-LLM Triton container."""
    mount = shlex.quote(f"{repo}:{repo}")
    return " ".join(["docker run --rm --gpus all --net host --shm-size=2g --ulimit memlock=-1 -v", mount,
                     container, shlex.join(server_argv(repo, layout, ports))])


class GpuStack(Stack):
    """NVIDIA's tritonserver with TensorRT-LLM's backend, in its container: one SM's engines (the in-flight
    batching ensemble) or the HF checkpoint (the llmapi model), for the artifact's target."""

    name = "gpu"
    start_timeout_s = 1800   # engines of tens of GB
    log_name = "tritonserver"
    pulls_engines = True

    def host_engines(self, home: Path, ref: str, host) -> tuple[str | None, str | None]:
        from kiln.registry import check_pullable

        if host is None or not host.sms:
            raise UserInputError("--stack gpu: this host has no NVIDIA GPU (fix: --stack cpu, or prepare a "
                                 "repository for a GPU host with `kiln triton-repo REF --stack gpu --gpu sm90 "
                                 "--templates DIR`)")
        sm, tensorrt = host.sms[0], host.tensorrt
        check_pullable(home, ref, sm, tensorrt)   # before gigabytes of engines are downloaded
        trtllm_tritonserver(target_needs_backend=False)
        return sm, tensorrt

    def write(self, staging: Path, artifact: Path, registered: str, final_root: Path, flags: ServeFlags,
              sm: str | None) -> dict:
        options = GpuServeOptions(templates=flags.templates, decoupled=flags.decoupled, instances=flags.instances,
                                  max_queue_delay_microseconds=flags.max_queue_delay_us,
                                  max_queue_size=flags.max_queue_size, container=flags.container or CONTAINER)
        # The configs name files by absolute path: the path they will have once `staging` becomes `final_root`.
        layout = write_gpu_layout(staging, sm, options, final_root=final_root)
        return {"models": layout.models, "entry_model": layout.entry_model, "stream_model": layout.stream_model,
                "sm": sm, "gpu_layout": layout,
                "container_command": docker_command(final_root, layout, options.container)}

    def server(self, repo: Repository, home: Path, endpoints: Endpoints, log: Path) -> TritonServer:
        binary = trtllm_tritonserver(target_needs_backend=repo.gpu_layout.disable_auto_complete)
        return TrtllmTritonServer(repo.path, home, repo.gpu_layout, binary, endpoints, log_path=log)

    def ask(self, repo: Repository, endpoints: Endpoints, prompt: str, max_tokens: int) -> str:
        """The layouts' generate endpoint, as NVIDIA's docs call it."""
        import urllib.request

        body = json.dumps({"text_input": prompt, repo.gpu_layout.max_tokens_input: max_tokens}).encode()
        url = f"http://127.0.0.1:{endpoints.http}/v2/models/{repo.entry_model}/generate"
        with urllib.request.urlopen(urllib.request.Request(url, body, method="POST"), timeout=600) as answer:
            text = json.loads(answer.read())["text_output"]
        return text[0] if isinstance(text, list) else text

    def written_lines(self, repo: Repository, ref: str) -> list[str]:
        layout = repo.gpu_layout
        lines = []
        dropped = sorted({name for names in layout.dropped.values() for name in names})
        if dropped:
            lines.append(f"optional parameters left unset (the backend's defaults apply): {', '.join(dropped)}")
        lines += ["start it in NVIDIA's TensorRT-LLM Triton container (it must see the repository at the same path):",
                  f"  {repo.container_command}"]
        if CONTAINER in repo.container_command:
            lines.append(f"  <yy.mm>: the container release whose TensorRT-LLM is "
                         f"{layout.tensorrt_llm or 'the one that built it'} (NVIDIA's Triton/TensorRT-LLM support "
                         "matrix); or kiln serve --stack gpu inside it")
        return lines

    def serving_lines(self, repo: Repository, endpoints: Endpoints) -> list[str]:
        return triton_serving_lines(repo, endpoints)
