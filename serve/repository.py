"""A Triton model repository for a registry artifact, written atomically by the chosen stack (kiln.serve.stacks)."""

from __future__ import annotations

import json
from pathlib import Path

from kiln.common.errors import UserInputError
from kiln.common.fsutil import atomic_dir, require_empty_folder
from kiln.serve.cpu_repo import ARTIFACT_DIR
from kiln.serve.stack import Repository, ServeFlags
from kiln.serve.stacks import STACKS, StackRow, stack_row

STACK_NAMES = tuple(STACKS)   # as `--stack` takes them


def loader_problem(row: StackRow, artifact: Path) -> str | None:
    """Why the loader a stack serves through cannot load the pulled artifact (the runtimes table, read for the
    formats its kiln.json records); None when it loads, or when the stack has no such loader."""
    from kiln.quantize import Backend, KVCacheFormat, recorded_formats, runtime_problem

    if row.loader is None:
        return None
    record = json.loads((artifact / "kiln.json").read_text())
    quant = recorded_formats(record["quant"], record.get("layer_formats", {}))
    return runtime_problem(row.loader, quant, KVCacheFormat(record["kv_cache"]), Backend(record.get("backend", "modelopt")))


def write_repository(home: Path, ref: str, out: Path, stack_name: str, progress, flags: ServeFlags = ServeFlags(),
                     sm: str | None = None, installed_tensorrt: str | None = None) -> Repository:
    """Pull `ref` (verified) and write a complete Triton model repository at `out`, atomically, for the stack
    `stack_name`; refused (nothing written) where the loader the stack serves through cannot load the artifact.

    A stack that serves engines (gpu) needs `sm`: the engines of that SM only are pulled (refused when the
    version holds none, or when they were built with another TensorRT than `installed_tensorrt`).
    """
    from kiln.registry import pull

    row = stack_row(stack_name)
    stack = row.load()
    if stack.pulls_engines and sm is None:
        raise UserInputError(f"--stack {stack_name}: this host has no GPU, so name the SM the repository is for "
                             "(fix: --gpu sm90, or --gpu H100)")
    out = require_empty_folder(out)
    with atomic_dir(out, shared=False) as staging:
        pulled = pull(home, ref, staging / ARTIFACT_DIR, progress, sm=sm if stack.pulls_engines else None,
                      installed_tensorrt=installed_tensorrt)
        problem = loader_problem(row, staging / ARTIFACT_DIR)
        if problem:
            raise UserInputError(f"--stack {stack_name}: {problem}")
        fields = stack.write(staging, staging / ARTIFACT_DIR, pulled.name, out, flags, sm)
    return Repository(out, pulled.name, pulled.version, stack_name, **fields)
