"""A Triton model repository for a registry artifact, written atomically by the chosen stack (kiln.serve.stacks)."""

from __future__ import annotations

from pathlib import Path

from kiln.common.errors import UserInputError
from kiln.common.fsutil import atomic_dir, require_empty_folder
from kiln.serve.cpu_repo import ARTIFACT_DIR
from kiln.serve.stack import Repository, ServeFlags
from kiln.serve.stacks import STACKS, stack_named

RUNTIMES = tuple(STACKS)   # the stacks' names, as `--runtime` takes them


def write_repository(home: Path, ref: str, out: Path, runtime: str, progress, flags: ServeFlags = ServeFlags(),
                     sm: str | None = None, installed_tensorrt: str | None = None) -> Repository:
    """Pull `ref` (verified) and write a complete Triton model repository at `out`, atomically.

    A stack that serves engines (gpu) needs `sm`: the engines of that SM only are pulled (refused when the
    version holds none, or when they were built with another TensorRT than `installed_tensorrt`).
    """
    from kiln.registry import pull

    stack = stack_named(runtime)
    if stack.pulls_engines and sm is None:
        raise UserInputError(f"--runtime {runtime}: this host has no GPU, so name the SM the repository is for "
                             "(fix: --gpu sm90, or --gpu H100)")
    out = require_empty_folder(out)
    with atomic_dir(out, shared=False) as staging:
        pulled = pull(home, ref, staging / ARTIFACT_DIR, progress, sm=sm if stack.pulls_engines else None,
                      installed_tensorrt=installed_tensorrt)
        fields = stack.write(staging, staging / ARTIFACT_DIR, pulled.name, out, flags, sm)
    return Repository(out, pulled.name, pulled.version, runtime, **fields)
