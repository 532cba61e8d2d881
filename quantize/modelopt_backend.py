"""Backend modelopt: NVIDIA ModelOpt calibrates in this process and exports the HF checkpoint (hf/) and, for
families with a TensorRT-LLM checkpoint, trtllm/ (checked and completed by trtllm_checks)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from kiln.common.versions import installed_versions
from kiln.quantize.checkpoint import HF_DIR, TRTLLM_DIR, CheckpointRecord, QuantizeRequest, release_memory, save_tokenizer
from kiln.quantize.families import Family
from kiln.quantize.formats import FORMATS, KVCacheFormat
from kiln.quantize.placement import Placement, gpu_peak_bytes, reset_gpu_peaks

TOOLS = ("nvidia-modelopt", "torch", "transformers")


def tool_versions() -> dict[str, str]:
    return installed_versions(TOOLS)


def require() -> None:
    """ModelOpt is kiln's own dependency: nothing to refuse."""


def run(request: QuantizeRequest, model_dir: Path, calibration, out_dir: Path, progress, placement: Placement,
        on_loaded, family: Family, source_config: dict) -> CheckpointRecord:
    # ModelOpt and torch load here, when a variant is quantized: a cached build never imports them.
    from kiln.quantize import modelopt_adapter as adapter
    from kiln.quantize.trtllm_checks import check_trtllm_checkpoint

    seconds = {}
    started = time.monotonic()
    reset_gpu_peaks(placement)
    model = adapter.load_source_model(model_dir, request.dtype, request.trust_remote_code, request.allow_pickle,
                                      placement)
    config = adapter.modelopt_config(request.quant, request.kv_cache, request.group_size, request.alpha, request.exclude)
    seconds["load"] = time.monotonic() - started
    if on_loaded is not None:
        started = time.monotonic()
        on_loaded(model)
        release_memory()   # what on_loaded computed with is gone before calibration grows the heap again
        seconds["before_calibration"] = time.monotonic() - started

    label = f"{request.quant.value}" + (f"+kv {request.kv_cache.value}" if request.kv_cache != KVCacheFormat.none else "")
    started = time.monotonic()
    with progress.task(f"calibrate {label}", total=len(calibration)) as task:
        adapter.calibrate(model, config, calibration, task.advance, request.calibration_batch_size,
                          on_pass=lambda n: task.restart(f"calibrate {label} (pass {n})"))
    seconds["calibrate"] = time.monotonic() - started

    started = time.monotonic()
    with progress.task(f"export {label}", total=3 if family.trtllm else 2) as task:
        adapter.export_hf(model, out_dir / HF_DIR, request.max_shard_size)
        task.advance()
        save_tokenizer(model_dir, out_dir / HF_DIR, request.trust_remote_code)
        task.advance()
        if family.trtllm:
            adapter.export_trtllm(model, out_dir / TRTLLM_DIR, request.dtype, request.tp_size)
            task.advance()
    seconds["export"] = time.monotonic() - started
    # Measured: a frame captured while ModelOpt first imports keeps this frame, and with it the model, alive
    # after return; dropping the name here is what lets the next stage's memory replace this one's.
    del model

    corrections = (check_trtllm_checkpoint(out_dir / TRTLLM_DIR, source_config, request.tp_size, label)
                   if family.trtllm else [])
    spec = FORMATS[request.quant]
    record = CheckpointRecord(
        quant=request.quant.value,
        kv_cache=request.kv_cache.value,
        algorithm=spec.algorithm,
        group_size=request.group_size or spec.default_group_size,
        dtype=request.dtype,
        tp_size=request.tp_size,
        calibration_samples=int(calibration.shape[0]),
        calibration_seq_len=int(calibration.shape[1]),
        tools=installed_versions(TOOLS),
        trtllm_corrections=[c.as_dict() for c in corrections],
        seconds={k: round(v, 3) for k, v in seconds.items()},
        export_quant_algo=json.loads((out_dir / HF_DIR / "hf_quant_config.json").read_text())["quantization"].get("quant_algo"),
        alpha=request.alpha,
        exclude=list(request.exclude),
        placement={**placement.record(), "peak_gpu_memory_bytes": gpu_peak_bytes(placement)},
        family=family.model_type,
        trtllm_checkpoint=family.trtllm is not None,
    )
    record.write(out_dir, model_dir)
    return record
