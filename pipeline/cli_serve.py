"""`kiln triton-repo` and `kiln serve`: Triton model repositories and a running server for registry artifacts."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import typer

from kiln.common.errors import UserInputError
from kiln.pipeline.cli_common import emit_json, kiln_home, private_tempdir, selected_sm

_RUNTIME_HELP = ("cpu: kiln's reference runtime in Triton's python backend (any artifact, any host). "
                 "gpu: TensorRT-LLM's own Triton models for the artifact's target (engines: the in-flight-batching "
                 "ensemble; trtllm-pytorch: the llmapi model), filled from --templates. vllm: triton-repo writes a "
                 "model for Triton's vLLM backend (model.json from the artifact); serve starts `vllm serve` "
                 "(OpenAI-compatible) where vLLM is installed (KILN_VLLM_PYTHON).")
_TEMPLATES_HELP = ("GPU runtime: TensorRT-LLM's triton_backend/all_models of the release that built the artifact "
                   "(git clone --branch v<version> https://github.com/NVIDIA/TensorRT-LLM).")


def _cpu_options(max_batch_size: int, max_queue_delay_us: int, instances: int, max_tokens: int):
    from kiln.serve import CpuServeOptions

    return CpuServeOptions(max_batch_size=max_batch_size, max_queue_delay_microseconds=max_queue_delay_us,
                           instances=instances, default_max_tokens=max_tokens)


def _gpu_options(templates: Path | None, decoupled: bool, instances: int, max_queue_delay_us: int,
                 max_queue_size: int, container: str | None):
    from kiln.serve import GpuServeOptions
    from kiln.serve.gpu_repo import CONTAINER

    return GpuServeOptions(templates=templates, decoupled=decoupled, instances=instances,
                           max_queue_delay_microseconds=max_queue_delay_us, max_queue_size=max_queue_size,
                           container=container or CONTAINER)


def _print_gpu_start(repo) -> None:
    from kiln.serve.gpu_repo import CONTAINER

    layout = repo.gpu_layout
    dropped = sorted({name for names in layout.dropped.values() for name in names})
    if dropped:
        print(f"optional parameters left unset (the backend's defaults apply): {', '.join(dropped)}")
    print("start it in NVIDIA's TensorRT-LLM Triton container (it must see the repository at the same path):")
    print(f"  {repo.container_command}")
    if CONTAINER in repo.container_command:
        print(f"  <yy.mm>: the container release whose TensorRT-LLM is {layout.tensorrt_llm or 'the one that built it'}"
              " (NVIDIA's Triton/TensorRT-LLM support matrix); or kiln serve --runtime gpu inside it")


def triton_repo(
    ref: str = typer.Argument(..., help="NAME@ALIAS or NAME/VERSION.", show_default=False),
    out: Path = typer.Option(..., "--out", help="Folder to create; must not exist or be empty."),
    runtime: str = typer.Option("cpu", "--runtime", help=_RUNTIME_HELP),
    gpu: str = typer.Option(None, "--gpu", show_default=False,
                            help="GPU runtime: whose engines, as an SM (sm90) or GPU name. Default: this host's GPU."),
    templates: Path = typer.Option(None, "--templates", envvar="KILN_TRTLLM_TEMPLATES", show_default=False,
                                   help=_TEMPLATES_HELP),
    decoupled: bool = typer.Option(False, "--decoupled/--no-decoupled",
                                   help="GPU runtime: stream responses (decoupled models; gRPC streaming)."),
    max_batch_size: int = typer.Option(8, "--max-batch-size", min=1,
                                       help="CPU runtime: Triton max_batch_size (GPU: the engine's own)."),
    max_queue_delay_us: int = typer.Option(1000, "--max-queue-delay-us", min=0,
                                           help="Dynamic batching: how long a request may wait for others."),
    max_queue_size: int = typer.Option(0, "--max-queue-size", min=0,
                                       help="GPU runtime: requests queued before new ones are refused (0: no limit)."),
    instances: int = typer.Option(1, "--instances", min=1,
                                  help="Instances per model (GPU: of pre/postprocessing and BLS)."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1,
                                   help="CPU runtime: tokens generated when a request names none."),
    container: str = typer.Option(None, "--container", show_default=False,
                                  help="GPU and vllm runtimes: the image in the printed command (default "
                                       "nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3, or -vllm-python-py3)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of lines."),
) -> None:
    """Pull an artifact (verified, as `kiln pull` does) and write a Triton model repository for it.

    The GPU layouts are TensorRT-LLM's own models, with every config.pbtxt filled (engine path,
    tokenizer, the engine's max_batch_size, KV-cache settings, queueing, instance counts) and parsed
    with Triton's schema; kiln then prints the `docker run` that serves it.
    """
    from kiln.compile import detect_host
    from kiln.common.progress import ProgressReporter
    from kiln.serve import write_repository
    from kiln.serve.vllm_repo import VLLM_CONTAINER, VllmServeOptions

    private_tempdir()
    sm = selected_sm(gpu, detect_host()) if runtime == "gpu" else None
    repo = write_repository(kiln_home(), ref, out, runtime, ProgressReporter(),
                            _cpu_options(max_batch_size, max_queue_delay_us, instances, max_tokens),
                            _gpu_options(templates, decoupled, instances, max_queue_delay_us, max_queue_size,
                                         container), sm=sm,
                            vllm_options=VllmServeOptions(container=container or VLLM_CONTAINER))
    if as_json:
        layout = repo.gpu_layout
        emit_json({"path": str(repo.path), "name": repo.name, "version": repo.version, "runtime": repo.runtime,
                    "sm": repo.sm, "models": list(repo.models), "entry_model": repo.entry_model,
                    "stream_model": repo.stream_model, "container_command": repo.container_command,
                    "world_size": layout.world_size if layout else 1,
                    "dropped_parameters": {m: list(d) for m, d in layout.dropped.items()} if layout else {}})
        return
    where = f" ({repo.sm})" if repo.sm else ""
    print(f"{repo.name}/{repo.version}{where} -> {repo.path}: models {', '.join(repo.models)}")
    if repo.gpu_layout:
        _print_gpu_start(repo)
    elif runtime == "vllm":
        print("start it in NVIDIA's vLLM Triton container (it must see the repository at the same path):")
        print(f"  {repo.container_command}")
        print("  <yy.mm>: a container release whose vLLM loads this checkpoint (see kiln's runtimes table); "
              f"or kiln serve {ref} --runtime vllm where vLLM is installed")
    else:
        print(f"start it with: kiln serve {ref} --runtime {runtime}   (or tritonserver --model-repository {repo.path} "
              f"--model-control-mode explicit {' '.join('--load-model=' + m for m in repo.models)})")


def serve(
    ref: str = typer.Argument(..., help="NAME@ALIAS or NAME/VERSION.", show_default=False),
    runtime: str = typer.Option("cpu", "--runtime", help=_RUNTIME_HELP),
    http_port: int = typer.Option(8000, "--http-port", help="HTTP port on 127.0.0.1 (0: any free port)."),
    grpc_port: int = typer.Option(8001, "--grpc-port", help="gRPC port on 127.0.0.1 (0: any free port)."),
    metrics_port: int = typer.Option(8002, "--metrics-port", help="Metrics port on 127.0.0.1 (0: any free port)."),
    max_batch_size: int = typer.Option(8, "--max-batch-size", min=1,
                                       help="CPU runtime: Triton max_batch_size (GPU: the engine's own)."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="Tokens generated when a request names none."),
    templates: Path = typer.Option(None, "--templates", envvar="KILN_TRTLLM_TEMPLATES", show_default=False,
                                   help=_TEMPLATES_HELP),
    decoupled: bool = typer.Option(False, "--decoupled/--no-decoupled",
                                   help="GPU runtime: stream responses (decoupled models; gRPC streaming)."),
    prompt: str = typer.Option(None, "--prompt", show_default=False,
                               help="Send this one prompt once the server is ready, print the completion, stop."),
) -> None:
    """Write the model repository for an artifact and run its server on 127.0.0.1 until Ctrl-C.

    CPU: nvidia-pytriton's tritonserver with kiln's reference runtime. GPU: NVIDIA's tritonserver
    with TensorRT-LLM's backend (inside its container), serving this host's SM only; engines built
    for another SM or another TensorRT are refused (exit 2). vLLM: vLLM's OpenAI-compatible server
    (`vllm serve`) in KILN_VLLM_PYTHON, on the HTTP port, with the engine arguments triton-repo
    writes; formats vLLM does not load are refused (exit 2). Prints the endpoints once the server
    is ready; Ctrl-C (or SIGTERM) stops it cleanly.
    """
    from kiln.common.progress import ProgressReporter
    from kiln.compile import detect_host
    from kiln.serve import start_server

    if prompt is not None and not prompt.strip():
        raise UserInputError("--prompt is empty: nothing to send (fix: give the prompt text, or leave --prompt out "
                             "to serve until Ctrl-C)")
    private_tempdir()
    running = start_server(kiln_home(), ref, runtime, ProgressReporter(), (http_port, grpc_port, metrics_port),
                           _cpu_options(max_batch_size, 1000, 1, max_tokens),
                           _gpu_options(templates, decoupled, 1, 1000, 0, None),
                           host=detect_host() if runtime == "gpu" else None)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        repo = running.repo
        if runtime == "vllm":
            print(f"serving {repo.name}/{repo.version} (vllm serve): OpenAI-compatible API at "
                  f"http://127.0.0.1:{running.endpoints.http}/v1, model {repo.entry_model}")
        else:
            print(f"serving {repo.name}/{repo.version} ({runtime}{', ' + repo.sm if repo.sm else ''}): "
                  f"{running.endpoints.describe()}")
            streaming = f", {repo.stream_model} (gRPC streaming, stream=true)" if repo.stream_model else ""
            print(f"models: {repo.entry_model} (one response per request){streaming}")
        sys.stdout.flush()
        if prompt is not None:
            print(f"prompt: {prompt!r}\ncompletion: {running.ask(prompt, max_tokens)!r}")
        else:
            while not stop.wait(0.5):
                pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        code = running.stop()
        print(f"{running.server.what} stopped (exit {code})", file=sys.stderr)
