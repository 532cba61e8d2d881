"""`kiln triton-repo` and `kiln serve`: Triton model repositories and a running server for registry artifacts."""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
from pathlib import Path

import typer

from kiln.pipeline.cli import _emit_json, _reported_errors, app, kiln_home

_RUNTIME_HELP = "cpu: kiln's reference runtime in Triton's python backend (any artifact, any host)."


def _cpu_options(max_batch_size: int, max_queue_delay_us: int, instances: int, max_tokens: int):
    from kiln.serve import CpuServeOptions

    return CpuServeOptions(max_batch_size=max_batch_size, max_queue_delay_microseconds=max_queue_delay_us,
                           instances=instances, default_max_tokens=max_tokens)


@app.command("triton-repo")
def triton_repo(
    ref: str = typer.Argument(..., help="NAME@ALIAS or NAME/VERSION.", show_default=False),
    out: Path = typer.Option(..., "--out", help="Folder to create; must not exist or be empty."),
    runtime: str = typer.Option("cpu", "--runtime", help=_RUNTIME_HELP),
    max_batch_size: int = typer.Option(8, "--max-batch-size", min=1, help="Triton max_batch_size."),
    max_queue_delay_us: int = typer.Option(1000, "--max-queue-delay-us", min=0,
                                           help="Dynamic batching: how long a request may wait for others."),
    instances: int = typer.Option(1, "--instances", min=1, help="Model instances (processes) per model."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="Tokens generated when a request names none."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of lines."),
) -> None:
    """Pull an artifact (verified, as `kiln pull` does) and write a Triton model repository for it."""
    from kiln.pipeline.progress import ProgressReporter
    from kiln.serve import write_repository

    with _reported_errors():
        repo = write_repository(kiln_home(), ref, out, runtime, ProgressReporter(),
                                _cpu_options(max_batch_size, max_queue_delay_us, instances, max_tokens))
    if as_json:
        _emit_json({"path": str(repo.path), "name": repo.name, "version": repo.version, "runtime": repo.runtime,
                    "models": list(repo.models), "entry_model": repo.entry_model, "stream_model": repo.stream_model})
        return
    print(f"{repo.name}/{repo.version} -> {repo.path}: models {', '.join(repo.models)}")
    print(f"start it with: kiln serve {ref} --runtime {runtime}   (or tritonserver --model-repository {repo.path} "
          f"--model-control-mode explicit {' '.join('--load-model=' + m for m in repo.models)})")


def _complete(endpoints, model: str, prompt: str, max_tokens: int) -> tuple[list[int], str]:
    import numpy as np
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(f"127.0.0.1:{endpoints.grpc}") as client:
        text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
        limit = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
        limit.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
        result = client.infer(model, [text, limit])
    return result.as_numpy("output_ids")[0].tolist(), result.as_numpy("text_output")[0][0].decode()


@app.command()
def serve(
    ref: str = typer.Argument(..., help="NAME@ALIAS or NAME/VERSION.", show_default=False),
    runtime: str = typer.Option("cpu", "--runtime", help=_RUNTIME_HELP),
    http_port: int = typer.Option(8000, "--http-port", help="HTTP port on 127.0.0.1 (0: any free port)."),
    grpc_port: int = typer.Option(8001, "--grpc-port", help="gRPC port on 127.0.0.1 (0: any free port)."),
    metrics_port: int = typer.Option(8002, "--metrics-port", help="Metrics port on 127.0.0.1 (0: any free port)."),
    max_batch_size: int = typer.Option(8, "--max-batch-size", min=1, help="Triton max_batch_size."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="Tokens generated when a request names none."),
    prompt: str = typer.Option(None, "--prompt", show_default=False,
                               help="Send this one prompt once the server is ready, print the completion, stop."),
) -> None:
    """Write the model repository for an artifact and run tritonserver on 127.0.0.1 until Ctrl-C.

    Prints the endpoints once the server is ready; Ctrl-C (or SIGTERM) stops it cleanly.
    """
    from kiln.pipeline.progress import ProgressReporter
    from kiln.serve import Endpoints, TritonServer, write_repository
    from kiln.serve.triton import free_port

    home = kiln_home()
    progress = ProgressReporter()
    with _reported_errors(), tempfile.TemporaryDirectory(prefix="kiln-serve-", dir=_serve_root(home)) as tmp:
        repo = write_repository(home, ref, Path(tmp) / "repository", runtime, progress,
                                _cpu_options(max_batch_size, 1000, 1, max_tokens))
        endpoints = Endpoints(*(port or free_port() for port in (http_port, grpc_port, metrics_port)))
        server = TritonServer(repo.path, home, repo.models, endpoints, log_path=Path(tmp) / "tritonserver.log")
        with progress.task(f"start tritonserver for {repo.name}/{repo.version}", total=None):
            server.start()
        stop = threading.Event()
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            print(f"serving {repo.name}/{repo.version} ({runtime}): {endpoints.describe()}")
            print(f"models: {repo.entry_model} (one response per request), {repo.stream_model} "
                  "(gRPC streaming, stream=true)")
            sys.stdout.flush()
            if prompt is not None:
                _, completion = _complete(endpoints, repo.entry_model, prompt, max_tokens)
                print(f"prompt: {prompt!r}\ncompletion: {completion!r}")
            else:
                while not stop.wait(0.5):
                    pass
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            code = server.stop()
            print(f"tritonserver stopped (exit {code})", file=sys.stderr)


def _serve_root(home: Path) -> Path:
    root = home / "serve"
    root.mkdir(parents=True, exist_ok=True)
    return root
