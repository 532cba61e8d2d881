"""`kiln triton-repo` and `kiln serve`: Triton model repositories and a running server for registry artifacts."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import typer

from kiln.common.errors import KilnError, UserInputError
from kiln.pipeline.cli.common import REF_HELP, emit_json, json_option, kiln_home, private_tempdir, selected_sm
from kiln.serve.stacks import stack_help

# Each serving stack's own sentence (kiln.serve.stacks). `--runtime` is the option's older name: a recipe's
# `runtimes:` name loaders (who reads a checkpoint), a stack is what serves it.
_STACK_HELP = "The serving stack. " + stack_help() + " (--runtime: its older name.)"


# The options triton-repo and serve share, defined once so that their help cannot drift apart.
def _stack_option():
    return typer.Option("cpu", "--stack", "--runtime", help=_STACK_HELP)


def _templates_option():
    return typer.Option(None, "--templates", envvar="KILN_TRTLLM_TEMPLATES", show_default=False,
                        help="gpu stack: TensorRT-LLM's triton_backend/all_models of the release that built the "
                             "artifact (git clone --branch v<version> https://github.com/NVIDIA/TensorRT-LLM).")


def _decoupled_option():
    return typer.Option(False, "--decoupled/--no-decoupled",
                        help="gpu stack: stream responses (decoupled models; gRPC streaming).")


def _max_batch_size_option():
    return typer.Option(8, "--max-batch-size", min=1, help="cpu stack: Triton max_batch_size (gpu: the engine's own).")


def _max_tokens_option():
    return typer.Option(64, "--max-tokens", min=1, help="cpu stack: tokens generated when a request names none.")


def triton_repo(
    ref: str = typer.Argument(..., help=REF_HELP, show_default=False),
    out: Path = typer.Option(..., "--out", help="Folder to create; must not exist or be empty."),
    stack_name: str = _stack_option(),
    gpu: str = typer.Option(None, "--gpu", show_default=False,
                            help="gpu stack: whose engines, as an SM (sm90) or GPU name. Default: this host's GPU."),
    templates: Path = _templates_option(),
    decoupled: bool = _decoupled_option(),
    max_batch_size: int = _max_batch_size_option(),
    max_queue_delay_us: int = typer.Option(1000, "--max-queue-delay-us", min=0,
                                           help="Dynamic batching: how long a request may wait for others."),
    max_queue_size: int = typer.Option(0, "--max-queue-size", min=0,
                                       help="gpu stack: requests queued before new ones are refused (0: no limit)."),
    instances: int = typer.Option(1, "--instances", min=1,
                                  help="Instances per model (gpu: of pre/postprocessing and BLS)."),
    max_tokens: int = _max_tokens_option(),
    container: str = typer.Option(None, "--container", show_default=False,
                                  help="gpu and vllm stacks: the image in the printed command (default "
                                       "nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3, or -vllm-python-py3)."),
    as_json: bool = json_option(),
) -> None:
    """Pull an artifact (verified, as `kiln pull` does) and write a Triton model repository for it.

    The GPU layouts are TensorRT-LLM's own models, with every config.pbtxt filled (engine path,
    tokenizer, the engine's max_batch_size, KV-cache settings, queueing, instance counts) and parsed
    with Triton's schema; kiln then prints the `docker run` that serves it.
    """
    from kiln.compile import detect_host
    from kiln.common.progress import ProgressReporter
    from kiln.serve import ServeFlags, stack_named, write_repository

    private_tempdir()
    stack = stack_named(stack_name)
    sm = selected_sm(gpu, detect_host()) if stack.pulls_engines else None
    flags = ServeFlags(templates=templates, decoupled=decoupled, max_batch_size=max_batch_size,
                       max_queue_delay_us=max_queue_delay_us, max_queue_size=max_queue_size, instances=instances,
                       max_tokens=max_tokens, container=container)
    repo = write_repository(kiln_home(), ref, out, stack_name, ProgressReporter(), flags, sm=sm)
    if as_json:
        layout = repo.gpu_layout
        emit_json({"path": str(repo.path), "name": repo.name, "version": repo.version, "stack": repo.stack,
                    "runtime": repo.stack,   # the key's older name, kept for scripts that read it
                    "sm": repo.sm, "models": list(repo.models), "entry_model": repo.entry_model,
                    "stream_model": repo.stream_model, "container_command": repo.container_command,
                    "world_size": layout.world_size if layout else 1,
                    "dropped_parameters": {m: list(d) for m, d in layout.dropped.items()} if layout else {}})
        return
    where = f" ({repo.sm})" if repo.sm else ""
    print(f"{repo.name}/{repo.version}{where} -> {repo.path}: models {', '.join(repo.models)}")
    print("\n".join(stack.written_lines(repo, ref)))


def serve(
    ref: str = typer.Argument(..., help=REF_HELP, show_default=False),
    stack_name: str = _stack_option(),
    http_port: int = typer.Option(8000, "--http-port", help="HTTP port on 127.0.0.1 (0: any free port)."),
    grpc_port: int = typer.Option(8001, "--grpc-port", help="gRPC port on 127.0.0.1 (0: any free port)."),
    metrics_port: int = typer.Option(8002, "--metrics-port", help="Metrics port on 127.0.0.1 (0: any free port)."),
    max_batch_size: int = _max_batch_size_option(),
    max_tokens: int = _max_tokens_option(),
    templates: Path = _templates_option(),
    decoupled: bool = _decoupled_option(),
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
    from kiln.serve import ServeFlags, stack_named, start_server

    if prompt is not None and not prompt.strip():
        raise UserInputError("--prompt is empty: nothing to send (fix: give the prompt text, or leave --prompt out "
                             "to serve until Ctrl-C)")
    private_tempdir()
    flags = ServeFlags(templates=templates, decoupled=decoupled, max_batch_size=max_batch_size, max_tokens=max_tokens)
    running = start_server(kiln_home(), ref, stack_name, ProgressReporter(), (http_port, grpc_port, metrics_port),
                           flags, host=detect_host() if stack_named(stack_name).pulls_engines else None)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        print("\n".join(running.serving_lines()))
        sys.stdout.flush()
        if prompt is not None:
            print(f"prompt: {prompt!r}\ncompletion: {running.ask(prompt, max_tokens)!r}")
        else:
            while not stop.wait(0.5):
                died = running.server.process.poll() if running.server.process else None
                if died is not None:   # nothing answers behind the endpoints any more: say so and fail
                    how = f"signal {signal.Signals(-died).name}" if died < 0 else f"exit {died}"
                    raise KilnError(f"{running.server.what} died while serving ({how}); its endpoints are closed (its "
                                    f"log: {running.server.log_path})")
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        died = running.server.process is not None and running.server.process.poll() is not None
        code = running.stop()
        if not died:
            print(f"{running.server.what} stopped (exit {code})", file=sys.stderr)
