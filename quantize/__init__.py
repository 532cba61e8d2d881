"""Quantize stage: calibrate a model with ModelOpt and export what ships.

Public entry points:
  run(request, model_dir, calibration, out_dir, progress, placement) -> CheckpointRecord
  layer_width_problems(model_dir, quant, group_size) -> list[str]
  plan_placement(device, gpus, gpu_memory_fraction, host_memory) -> Placement   (CPU, or GPUs + offload)
  FAMILIES / family_of / family_problems        the model-family table (what TensorRT-LLM supports per family)
  Runtime / runtime_cells / runtime_problem     the runtimes table (which runtimes load each checkpoint format)
  require_backend(backend) / tool_versions(backend)   backend llmcompressor runs in its own interpreter
  checkpoint_size(hf_dir, source_dir) -> CheckpointSize   checkpoint bytes, bits per decoder weight
Everything else in this folder is private to the stage.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from kiln.common.versions import installed_versions
from kiln.quantize.families import (
    COMMON_TRTLLM_FIELDS, FAMILIES, Family, family_of, family_problems, trtllm_values_agree,
)
from kiln.quantize.formats import (
    FORMATS, KV_CACHE_FORMATS, Backend, FormatSpec, Kernel, KVCacheFormat, KVCacheSpec, LlmCompressorMapping,
    QuantFormat, TrtllmMapping, format_of_export, kv_cache_of_export, register_format, unregister_format,
)
from kiln.quantize.headers import safetensors_header
from kiln.quantize.size import CheckpointSize, checkpoint_size
from kiln.quantize.placement import Device, Placement, VisibleGpu, gpu_peak_bytes, plan_placement, reset_gpu_peaks
from kiln.quantize.runtimes import (
    Loads, Runtime, loading_runtimes, runtime_cells, runtime_problem, vllm_device_problem,
)

CHECKPOINT_RECORD = "kiln.json"
SOURCE_CONFIG = "source-config.json"   # the source model's config.json, verbatim: compile hands it to TensorRT-LLM
HF_DIR = "hf"
TRTLLM_DIR = "trtllm"
STAGE_VERSION = 2   # 2: family fields filled in trtllm/config.json; kiln.json records the family
TOOLS = ("nvidia-modelopt", "torch", "transformers")

__all__ = [
    "FORMATS", "KV_CACHE_FORMATS", "Backend", "FormatSpec", "Kernel", "KVCacheFormat", "KVCacheSpec",
    "LlmCompressorMapping", "QuantFormat", "TrtllmMapping", "format_of_export", "kv_cache_of_export",
    "register_format", "unregister_format", "tool_versions", "require_backend",
    "QuantizeRequest", "CheckpointRecord", "run", "release_memory", "layer_width_problems", "unmatched_excludes",
    "Device", "Placement", "VisibleGpu", "plan_placement", "gpu_peak_bytes", "reset_gpu_peaks",
    "CHECKPOINT_RECORD", "HF_DIR", "TRTLLM_DIR", "STAGE_VERSION", "TOOLS",
    "FAMILIES", "Family", "family_of", "family_problems", "COMMON_TRTLLM_FIELDS", "SOURCE_CONFIG",
    "trtllm_values_agree", "Loads", "Runtime", "loading_runtimes", "runtime_cells", "runtime_problem",
    "vllm_device_problem", "CheckpointSize", "checkpoint_size",
]


@dataclass(frozen=True)
class QuantizeRequest:
    quant: QuantFormat
    kv_cache: KVCacheFormat
    group_size: int | None
    dtype: str
    tp_size: int
    trust_remote_code: bool = False
    allow_pickle: bool = False
    alpha: float | None = None
    exclude: tuple[str, ...] = ()   # module name patterns kept unquantized
    max_shard_size: str = "5GB"     # the HF export's largest safetensors file
    calibration_batch_size: int = 1  # samples per calibration forward pass
    backend: Backend = Backend.modelopt


@dataclass(frozen=True)
class CheckpointRecord:
    """kiln's own description of an exported variant (kiln.json beside hf/ and trtllm/)."""

    quant: str
    kv_cache: str
    algorithm: str
    group_size: int | None
    dtype: str
    tp_size: int
    calibration_samples: int
    calibration_seq_len: int
    tools: dict[str, str]
    trtllm_corrections: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    # The export format's own label can hide the algorithm (GPTQ exports say W4A16_AWQ): kiln keeps both.
    export_quant_algo: str | None = None
    alpha: float | None = None
    exclude: list[str] = field(default_factory=list)
    # Where it was calibrated: {"device": "cpu" | "cuda", "gpus": [names], "peak_gpu_memory_bytes": {gpu: bytes}}.
    placement: dict = field(default_factory=dict)
    # The family-table row (model_type) and whether a TensorRT-LLM checkpoint (trtllm/) was written:
    # families without one publish the HF checkpoint for TensorRT-LLM's PyTorch backend only.
    family: str | None = None
    trtllm_checkpoint: bool = True
    backend: str = Backend.modelopt.value   # what made it: modelopt | llmcompressor (compressed-tensors, no trtllm/)

    @classmethod
    def load(cls, checkpoint_dir: Path) -> "CheckpointRecord":
        return cls(**json.loads((Path(checkpoint_dir) / CHECKPOINT_RECORD).read_text()))


def _linear_input_widths(model_dir: Path) -> dict[str, int]:
    """Input width of every 2-D weight, read from safetensors headers (no tensor is loaded)."""
    widths = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        for name, info in safetensors_header(path).items():
            if not name.endswith(".weight") or len(info["shape"]) != 2:
                continue
            if "embed" in name or "lm_head" in name:  # ModelOpt leaves these unquantized
                continue
            widths[name[: -len(".weight")]] = info["shape"][1]
    return widths


def _config_input_widths(config: dict) -> dict[str, int]:
    """Input widths of a decoder's linear layers from config.json alone (before the weights are fetched)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    widths = {}
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj"):
            widths[f"{layer}.self_attn.{proj}"] = hidden
        widths[f"{layer}.self_attn.o_proj"] = heads * head_dim
        widths[f"{layer}.mlp.gate_proj"] = widths[f"{layer}.mlp.up_proj"] = hidden
        widths[f"{layer}.mlp.down_proj"] = inter
    return widths


def layer_width_problems(model_dir: Path, quant: QuantFormat, group_size: int | None,
                         exclude: tuple[str, ...] = ()) -> list[str]:
    """Layers whose input width the format's block size does not divide, grouped by name pattern.

    Reads safetensors headers when the weights are there, else config.json. Excluded layers
    stay unquantized, so their widths do not matter.
    """
    from fnmatch import fnmatchcase

    spec = FORMATS[quant]
    block = group_size or spec.default_group_size
    if not block:
        return []
    import re

    model_dir = Path(model_dir)
    if any(model_dir.glob("*.safetensors")):
        widths = _linear_input_widths(model_dir)
    else:
        widths = _config_input_widths(json.loads((model_dir / "config.json").read_text()))
    bad: dict[str, int] = {}
    for name, width in widths.items():
        if any(fnmatchcase(name, pattern) for pattern in exclude):
            continue
        if width % block:
            bad.setdefault(re.sub(r"\.\d+\.", ".*.", name), width)
    return [f"{pattern} (input width {width})" for pattern, width in sorted(bad.items())]


def unmatched_excludes(model_dir: Path, exclude: tuple[str, ...]) -> list[str]:
    """Exclude patterns that name no module of the model: a typo would otherwise quantize everything.

    Module names come from the safetensors headers (a tensor's name less its last part); `lm_head`
    exists even when tied to the embeddings. Without weights on disk nothing can be said: [].
    """
    from fnmatch import fnmatchcase

    shards = sorted(Path(model_dir).glob("*.safetensors"))
    if not exclude or not shards:
        return []
    modules = {"lm_head"}
    for path in shards:
        modules |= {name.rsplit(".", 1)[0] for name in safetensors_header(path) if "." in name}
    return [p for p in exclude if not any(fnmatchcase(m, p) for m in modules)]


def run(request: QuantizeRequest, model_dir: Path, calibration, out_dir: Path, progress,
        placement: Placement = Placement("cpu"), on_loaded: Callable[[object], None] | None = None) -> CheckpointRecord:
    """Calibrate `model_dir` on `calibration` ([n, seq_len] token ids) and write hf/, trtllm/, kiln.json.

    `progress` is a pipeline progress reporter (task(description, total) -> context with advance()).
    Each call reads the weights from disk (memory-mapped safetensors) and releases them on return:
    one copy of the model in memory, whatever the number of variants. `placement` says where the
    model lives while it is calibrated and exported (the CPU, or GPUs with CPU offload).
    `on_loaded(model)` sees the source model as loaded, before calibration changes it, and must
    give it back unchanged (the pipeline takes the baseline's logits there: one read of the weights).
    """
    from kiln.common.progress import quiet_libraries

    with quiet_libraries():
        try:
            return _run(request, model_dir, calibration, Path(out_dir), progress, placement, on_loaded)
        finally:
            release_memory()


def release_memory() -> None:
    """Collect the finished model and hand freed heap pages back to the OS, so the next model's peak
    does not sit on top of this one's (glibc keeps freed arenas otherwise)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def require_backend(backend: Backend) -> None:
    """Refuse (UserInputError, with the fix) a backend whose tool this host lacks; ModelOpt is kiln's own."""
    if backend is Backend.llmcompressor:
        from kiln.quantize.llmcompressor_backend import llmcompressor_python

        llmcompressor_python()


def tool_versions(backend: Backend = Backend.modelopt) -> dict[str, str]:
    """The versions a variant's quantize stage depends on (its cache key): kiln's own packages for ModelOpt,
    those of llm-compressor's interpreter for llm-compressor."""
    if backend is Backend.llmcompressor:
        from kiln.quantize.llmcompressor_backend import tool_versions as llmcompressor_versions

        return llmcompressor_versions()
    return installed_versions(TOOLS)


def _run(request: QuantizeRequest, model_dir: Path, calibration, out_dir: Path, progress,
         placement: Placement, on_loaded) -> CheckpointRecord:
    source_config = json.loads((Path(model_dir) / "config.json").read_text())
    family = family_of(source_config)
    if family is None:   # `kiln check` refuses these first; this guards direct callers
        raise ValueError(f"{model_dir}: model_type '{source_config.get('model_type')}' is not in kiln's family table")
    if request.backend is Backend.llmcompressor:
        from kiln.quantize import llmcompressor_backend

        return llmcompressor_backend.run(request, model_dir, calibration, out_dir, progress, family)
    return _run_modelopt(request, model_dir, calibration, out_dir, progress, placement, on_loaded, family,
                         source_config)


def _run_modelopt(request: QuantizeRequest, model_dir: Path, calibration, out_dir: Path, progress,
                  placement: Placement, on_loaded, family: Family, source_config: dict) -> CheckpointRecord:
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
    shutil.copyfile(Path(model_dir) / "config.json", out_dir / SOURCE_CONFIG)
    (out_dir / CHECKPOINT_RECORD).write_text(json.dumps(asdict(record), indent=2, sort_keys=True) + "\n")
    return record


def save_tokenizer(model_dir: Path, dest: Path, trust_remote_code: bool) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code).save_pretrained(dest)
