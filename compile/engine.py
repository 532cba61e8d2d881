"""Target trtllm-engine: TensorRT engines built by TensorRT-LLM's `trtllm-build`.

`trtllm-build` has no quantization flag: it reads `quantization.quant_algo` and
`kv_cache_quant_algo` from the checkpoint. kiln chooses only the flags below;
each is cited in tests/test_compile_contract.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from kiln.compile.gpus import ARCHS
from kiln.compile.targets import CheckpointQuant, CompileRequest
from kiln.quantize import format_of_export, kv_cache_of_export
from kiln.common.errors import KilnError

TRTLLM_BUILD = "trtllm-build"
BUILD_LOG = "build.log"

def gemm_plugin(quant: CheckpointQuant) -> str:
    """The format table's GEMM plugin for the checkpoint's quant_algo; "auto" lets TensorRT-LLM choose."""
    spec = format_of_export(quant.quant_algo)
    return spec.trtllm.gemm_plugin if spec is not None and spec.trtllm is not None else "auto"


def uses_fp8_context_fmha(quant: CheckpointQuant, sm: str) -> bool:
    """The format table's FP8 workflow (FP8 weights and KV cache) on an SM with its context FMHA kernels."""
    spec, kv = format_of_export(quant.quant_algo), kv_cache_of_export(quant.kv_cache_quant_algo)
    return bool(spec and spec.trtllm and spec.trtllm.fp8_context_fmha and kv and kv.fp8_context_fmha
                and ARCHS[sm].fp8_context_fmha)


def trtllm_build_argv(request: CompileRequest, quant: CheckpointQuant, checkpoint_dir: Path, output_dir: Path) -> list[str]:
    argv = [
        TRTLLM_BUILD,
        "--checkpoint_dir", str(checkpoint_dir),
        "--output_dir", str(output_dir),
        "--max_batch_size", str(request.max_batch_size),
        "--max_input_len", str(request.max_input_len),
        "--max_seq_len", str(request.max_seq_len),
        "--max_num_tokens", str(request.max_num_tokens),
        "--kv_cache_type", "paged",
        "--gemm_plugin", gemm_plugin(quant),
    ]
    if uses_fp8_context_fmha(quant, request.sm):
        argv += ["--use_fp8_context_fmha", "enable"]
    if request.kv_cache_reuse:
        argv += ["--use_paged_context_fmha", "enable"]  # KV-cache reuse needs paged context FMHA
    # The engine check compares the engine's logits over the evaluation text with the baseline's.
    argv += ["--gather_context_logits"]
    argv += ["--workers", str(request.tp_size)]
    if request.lora_target_modules:
        argv += ["--lora_plugin", "auto", "--lora_target_modules", *request.lora_target_modules,
                 "--max_lora_rank", str(request.max_lora_rank)]
    if request.speculative_mode:
        argv += ["--speculative_decoding_mode", request.speculative_mode, "--max_draft_len", str(request.max_draft_len)]
    return argv


def build_engine(request: CompileRequest, trtllm_dir: Path, out: Path, gpu_indices: tuple[int, ...], progress) -> list[str]:
    """Run trtllm-build into `out` (config.json, rank<N>.engine, build.log); return the command it ran."""
    quant = CheckpointQuant.of_trtllm(trtllm_dir)
    if quant.tp_size != request.tp_size:
        raise KilnError(f"{trtllm_dir}/config.json: mapping.tp_size is {quant.tp_size} but build.tp_size is "
                        f"{request.tp_size}; the checkpoint must be exported for the same tensor parallelism")
    executable = shutil.which(TRTLLM_BUILD)
    if executable is None:
        raise KilnError(f"{TRTLLM_BUILD} is not on PATH (fix: install TensorRT-LLM 0.17 to 1.2 or use its container; "
                        "see compile/README.md)")
    argv = trtllm_build_argv(request, quant, trtllm_dir, out)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in gpu_indices)}
    log_path = out / BUILD_LOG
    out.mkdir(parents=True, exist_ok=True)
    with progress.task(f"trtllm-build {request.sm}", total=None), log_path.open("w") as log:
        started = time.monotonic()
        returncode = subprocess.run([executable, *argv[1:]], stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        elapsed = time.monotonic() - started
    if returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise KilnError(f"trtllm-build for {request.sm} exited {returncode} after {elapsed:.0f} s; last lines:\n  "
                        + "\n  ".join(tail) + f"\n  full log: {log_path}")
    _check_engine_folder(out, request, quant)
    return argv


def _check_engine_folder(out: Path, request: CompileRequest, quant: CheckpointQuant) -> None:
    """The folder trtllm-build wrote must hold what the TensorRT-LLM runtime loads."""
    import json

    config_path = out / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        raise KilnError(f"trtllm-build wrote no readable {config_path}") from None
    missing = [f"rank{rank}.engine" for rank in range(request.tp_size) if not (out / f"rank{rank}.engine").is_file()]
    if missing:
        raise KilnError(f"trtllm-build left {out} without {', '.join(missing)}")
    built = (config.get("pretrained_config") or {}).get("quantization") or {}
    if built.get("quant_algo") != quant.quant_algo or built.get("kv_cache_quant_algo") != quant.kv_cache_quant_algo:
        raise KilnError(f"{config_path}: the engine was built as quant_algo={built.get('quant_algo')}, "
                        f"kv_cache_quant_algo={built.get('kv_cache_quant_algo')}, but the checkpoint says "
                        f"{quant.quant_algo}, {quant.kv_cache_quant_algo}")
    build_config = config.get("build_config") or {}
    if build_config.get("max_batch_size") not in (None, request.max_batch_size):
        raise KilnError(f"{config_path}: build_config.max_batch_size {build_config.get('max_batch_size')} "
                        f"differs from the requested {request.max_batch_size}")
