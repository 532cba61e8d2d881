"""The compile stage's work: per target type (BUILDERS), an SM's artifacts under engines/<sm>/ and their record."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from kiln.compile.host import Host
from kiln.compile.targets import (
    ENGINE_RECORD, LLM_API_OPTIONS, SM_DIR, CheckpointQuant, CompileRequest, Target,
)
from kiln.common.errors import KilnError
from kiln.quantize import HF_DIR, SOURCE_CONFIG, TRTLLM_DIR, CheckpointRecord, family_of   # what quantize writes

STAGE_VERSION = 1


def sm_folder(sm: str) -> str:
    """The artifact-relative folder holding one SM's files."""
    return f"{SM_DIR}/{sm}"


def tools(host: Host, target: Target) -> dict[str, str]:
    """Tool versions that go into the compile key: an engine is only valid for the TensorRT that built it."""
    found = {"tensorrt_llm": host.tensorrt_llm or "absent"}
    if target is Target.trtllm_engine:
        found["tensorrt"] = host.tensorrt or "absent"
    return found


def _build_engine(request: CompileRequest, checkpoint_dir: Path, sm_dir: Path, host: Host, progress) -> dict:
    from kiln.compile.engine import build_engine
    from kiln.compile.trtllm_config import check_against_trtllm

    source_fields = _source_family_fields(checkpoint_dir)
    gpus = tuple(g.index for g in host.gpus_of(request.sm))
    if (checkpoint_dir / TRTLLM_DIR).is_dir():
        checked = check_against_trtllm(checkpoint_dir / TRTLLM_DIR, *source_fields, request.tp_size)
        argv = build_engine(request, checkpoint_dir / TRTLLM_DIR, sm_dir, gpus, progress)
        return {"command": argv, "inputs": TRTLLM_DIR, "trtllm_config_checked": checked}
    # hf/ only (a build under calibration.offload: disk): TensorRT-LLM's converter writes the checkpoint first,
    # in this process's scratch; the engine is built from, and records, hf/.
    import tempfile

    from kiln.compile.trtllm_convert import convert_hf_checkpoint

    with tempfile.TemporaryDirectory(prefix="kiln-trtllm-convert-") as scratch:
        converted = Path(scratch) / TRTLLM_DIR
        convert = convert_hf_checkpoint(checkpoint_dir / HF_DIR, converted, Path(scratch),
                                        CheckpointRecord.load(checkpoint_dir).dtype, request.tp_size, progress)
        checked = check_against_trtllm(converted, *source_fields, request.tp_size)
        argv = build_engine(request, converted, sm_dir, gpus, progress)
    return {"command": argv, "inputs": HF_DIR, "trtllm_config_checked": checked, "converted_by": convert}


def _source_family_fields(checkpoint_dir: Path) -> tuple[dict, tuple[str, ...]]:
    """The source config the checkpoint was made from, and the fields TensorRT-LLM must agree on."""
    path = checkpoint_dir / SOURCE_CONFIG
    if not path.is_file():
        raise KilnError(f"{checkpoint_dir} has no {SOURCE_CONFIG}: it was quantized by an older kiln, whose "
                        "TensorRT-LLM config kiln cannot check (fix: rebuild the variant's checkpoint)")
    source = json.loads(path.read_text())
    family = family_of(source)
    if family is None or family.trtllm is None:
        raise KilnError(f"{checkpoint_dir}: model_type {source.get('model_type')!r} has no TensorRT-LLM checkpoint "
                        "in kiln's family table (fix: build.target: trtllm-pytorch)")
    return source, family.trtllm_field_names


def _write_llm_api_options(request: CompileRequest, checkpoint_dir: Path, sm_dir: Path, host: Host, progress) -> dict:
    import yaml

    from kiln.compile.llmapi import llm_api_options
    from kiln.common.fsutil import atomic_write_text

    options = llm_api_options(request, CheckpointQuant.of_hf(checkpoint_dir / HF_DIR, request.tp_size))
    sm_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sm_dir / LLM_API_OPTIONS, yaml.safe_dump(options, sort_keys=False))
    serve = ["trtllm-serve", HF_DIR, "--backend", "pytorch", "--extra_llm_api_options",
             f"{sm_folder(request.sm)}/{LLM_API_OPTIONS}"]
    return {"command": serve, "inputs": HF_DIR}


BUILDERS: dict[Target, Callable[..., dict]] = {
    Target.trtllm_engine: _build_engine,
    Target.trtllm_pytorch: _write_llm_api_options,
}


def run(request: CompileRequest, checkpoint_dir: Path, out: Path, host: Host, progress) -> dict:
    """Build one SM's artifact from the quantize stage's checkpoint into `out/engines/<sm>/`."""
    from kiln.common.digest import tree_manifest

    problem = host.compile_problem(request.sm, request.target, request.tp_size)
    if problem:
        raise KilnError(f"cannot compile for {request.sm} here: {problem} (see `kiln doctor`)")
    sm_dir = Path(out) / sm_folder(request.sm)
    started = time.monotonic()
    built = BUILDERS[request.target](request, Path(checkpoint_dir), sm_dir, host, progress)
    inputs_dir = Path(checkpoint_dir) / built["inputs"]
    gpu = host.gpus_of(request.sm)[0]
    record = {
        "format": 1,
        "sm": request.sm,
        "gpu": gpu.name,
        "target": request.target.value,
        "tensorrt": host.tensorrt if request.target is Target.trtllm_engine else None,
        "tensorrt_llm": host.tensorrt_llm,
        "cuda_driver": host.driver,
        "command": built["command"],
        "trtllm_config_checked": built.get("trtllm_config_checked"),
        "converted_by": built.get("converted_by"),   # TensorRT-LLM's converter, when the checkpoint has hf/ only
        "build_seconds": round(time.monotonic() - started, 3),
        "request": request.key_config(),
        # The checkpoint files this SM's artifact was built from: the registry refuses to pair it with others.
        "inputs": {f"{built['inputs']}/{rel}": info["sha256"] for rel, info in tree_manifest(inputs_dir).items()},
    }
    (sm_dir / ENGINE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def load_record(sm_dir: Path) -> dict:
    return json.loads((Path(sm_dir) / ENGINE_RECORD).read_text())
