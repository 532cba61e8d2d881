"""Quantize stage: calibrate a model with its backend (ModelOpt, llm-compressor) and export what ships.

Public entry points:
  run(request, model_dir, calibration, out_dir, progress, placement, on_loaded, resume_dir, workers)
                                                  -> CheckpointRecord (request.day0: quantize/day0.py, from the shards)
  day0_problem(quant, kv_cache, algorithm, backend, family) -> str | None   why the day-0 path cannot; QuantizePath
  resume_point(resume_dir) -> Resumed | None    where a killed calibration would resume (layer k of n)
      (request.auto set, quant "auto": ModelOpt's per-layer format search under a budget, auto_precision.py)
  score(request, model_dir, calibration, out_dir, progress, placement, budgets) -> dict   a size search's scores,
      once for every budget (SEARCH_STATE, SCORE_RECORD; read_score(entry)); run(..., search_state=) restores them
  layer_width_problems(model_dir, quant, group_size) -> list[str]
  plan_placement(device, gpus, gpu_memory_fraction, host_memory, offload, max_host_memory) -> Placement
                                                  (CPU, or GPUs + offload to host memory, then disk)
  FAMILIES / family_of / family_problems        the model-family table (what TensorRT-LLM supports per family)
  Runtime / runtime_cells / runtime_problem     the runtimes table (which runtimes load each checkpoint format)
  require_backend(backend) / tool_versions(backend)   backend llmcompressor runs in its own interpreter
  checkpoint_size(hf_dir, source_dir) -> CheckpointSize   checkpoint bytes, bits per decoder weight
  peak_memory(shape, dtype_bytes, formats, calibration_tokens, gpu_caps, offload) -> (calibrate, export)
                                                  the stage's memory formula, from config.json alone
The day-0 path (day0.py) is ModelOpt's own quantization of each linear, run from the safetensors shards: no model,
no calibration, the same HF checkpoint byte for byte, for the formats whose rows are `calibration_free`.
Backends (one module each, in BACKENDS): modelopt_backend, llmcompressor_backend. Everything else in this
folder is private to the stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from kiln.quantize import day0, distributed, llmcompressor_backend, modelopt_backend
from kiln.quantize.distributed import CalibrationRankError
from kiln.quantize.day0 import DayZeroError, QuantizePath
from kiln.quantize.day0 import model_problem as day0_model_problem
from kiln.quantize.day0 import problem as day0_problem
from kiln.quantize.checkpoint import (
    HF_DIR, MODEL_DTYPE_BYTES, SOURCE_CONFIG, TRTLLM_DIR, UNQUANTIZED_BY_DEFAULT, AutoRequest, CheckpointRecord, QuantizeRequest,
    recorded_formats, release_memory,
)
from kiln.quantize.families import FAMILIES, Family, family_of, family_problems, trtllm_values_agree
from kiln.quantize.formats import (
    AUTO, FORMATS, KV_CACHE_FORMATS, MIXED_PRECISION, Backend, FormatSpec, Kernel, KVCacheFormat, QuantFormat,
    format_of_export, kv_cache_of_export, kv_calibration_note,
)
from kiln.quantize.memory import exported_bytes, min_weight_bits, offload_folder_writes, peak_memory
from kiln.quantize.modelopt_backend import TOOLS
from kiln.quantize.resume import Resumed, resume_point
from kiln.quantize.registration import register_format, row_problems, unregister_format
from kiln.quantize.size import CheckpointSize, checkpoint_size
from kiln.quantize.source_check import refuse_nonfinite_weights
from kiln.quantize.placement import Device, Offload, Placement, VisibleGpu, plan_placement
from kiln.quantize.runtimes import (
    Loads, Quant, Runtime, loading_runtimes, runtime_cells, runtime_problem, vllm_device_problem,
)
from kiln.quantize import auto_precision
from kiln.quantize.auto_precision import SCORE_RECORD, SEARCH_STATE, lowest_budget
from kiln.quantize.widths import layer_width_problems, unmatched_excludes

STAGE_VERSION = 2   # 2: family fields filled in trtllm/config.json; kiln.json records the family
# What quantizes a variant, by its recipe's `backend`: each module has run, require and tool_versions.
BACKENDS = {Backend.modelopt: modelopt_backend, Backend.llmcompressor: llmcompressor_backend}

__all__ = [
    "score", "read_score", "SEARCH_STATE", "SCORE_RECORD",
    "run", "writes_here", "require_backend", "tool_versions", "BACKENDS", "QuantizeRequest", "AutoRequest", "CheckpointRecord", "recorded_formats",
    "release_memory", "AUTO", "MIXED_PRECISION", "FORMATS", "KV_CACHE_FORMATS", "Backend", "FormatSpec", "Kernel", "KVCacheFormat", "QuantFormat",
    "format_of_export", "kv_cache_of_export", "kv_calibration_note", "register_format", "unregister_format", "row_problems",
    "layer_width_problems", "unmatched_excludes", "lowest_budget", "Device", "Offload", "Placement", "VisibleGpu", "plan_placement",
    "HF_DIR", "MODEL_DTYPE_BYTES", "TRTLLM_DIR", "SOURCE_CONFIG", "STAGE_VERSION", "TOOLS", "UNQUANTIZED_BY_DEFAULT",
    "FAMILIES", "Family", "family_of", "family_problems", "trtllm_values_agree",
    "Loads", "Quant", "Runtime", "loading_runtimes", "runtime_cells", "runtime_problem", "vllm_device_problem",
    "CheckpointSize", "checkpoint_size", "refuse_nonfinite_weights",
    "DayZeroError", "QuantizePath", "CalibrationRankError", "day0_problem", "day0_model_problem",
    "peak_memory", "exported_bytes", "min_weight_bits", "offload_folder_writes", "Resumed", "resume_point",
]


def run(request: QuantizeRequest, model_dir: Path, calibration, out_dir: Path, progress,
        placement: Placement = Placement("cpu"), on_loaded: Callable[[object], None] | None = None,
        resume_dir: Path | None = None, workers: int | None = None,
        search_state: Path | None = None) -> CheckpointRecord:
    """Calibrate `model_dir` on `calibration` ([n, seq_len] token ids) and write hf/, trtllm/, kiln.json.

    `progress` is a pipeline progress reporter (task(description, total) -> context with advance()).
    Each call reads the weights from disk (memory-mapped safetensors) and releases them on return:
    one copy of the model in memory, whatever the number of variants. `placement` says where the
    model lives while it is calibrated and exported (the CPU, or GPUs with CPU offload).
    `on_loaded(model)` sees the source model as loaded, before calibration changes it, and must
    give it back unchanged (the pipeline takes the baseline's hidden states there: one read of the weights).
    With `resume_dir`, ModelOpt calibrates a decoder layer at a time and saves each one there: the same checkpoint,
    and a run killed mid-way resumes from the last layer whose digests kiln recorded (quantize/resume.py).
    With `request.day0`, `calibration`, `placement` and `on_loaded` go unused: `workers` threads quantize the
    shards (quantize/day0.py), checking each tensor is finite as they read it, and `resume_dir` keeps the finished
    output shards. With `request.auto`, `search_state` is the score stage's saved search (score()): the candidate
    restores every format's calibration and every layer's score from it and only solves its budget.
    With `request.processes` > 1, that many ranks calibrate under torchrun, each on its share of `calibration`,
    and rank 0 exports (quantize/distributed.py; llm-compressor's own ranks for backend llmcompressor); `on_loaded`
    and `resume_dir` go unused. With `request.nodes` > 1
    this host is one of them: where it is not node 0 (writes_here), it writes nothing and returns None.
    """
    from kiln.common.progress import quiet_libraries

    source_config = json.loads((Path(model_dir) / "config.json").read_text())
    family = family_of(source_config)
    if family is None:   # `kiln check` refuses these first; this guards direct callers
        raise ValueError(f"{model_dir}: model_type '{source_config.get('model_type')}' is not in kiln's family table")
    if request.day0:
        with quiet_libraries():
            try:
                return day0.run(request, Path(model_dir), Path(out_dir), progress, family, resume_dir, workers)
            finally:
                release_memory()
    refuse_nonfinite_weights(Path(model_dir))
    if request.ranks > 1 and request.backend is Backend.modelopt:   # the ranks are processes of their own: this one
        return distributed.run(request, Path(model_dir), calibration, Path(out_dir), progress, placement)  # waits
    with quiet_libraries():
        try:
            extra = {"search_state": search_state} if search_state is not None else {}
            return BACKENDS[request.backend].run(request, model_dir, calibration, Path(out_dir), progress, placement,
                                                 on_loaded, family, source_config, resume_dir, **extra)
        finally:
            release_memory()


def writes_here(request: QuantizeRequest) -> bool:
    """Whether this host writes the request's checkpoint: every host but nodes 1.. of a calibration across nodes
    (which node this is comes from the environment: distributed.Node)."""
    return request.nodes == 1 or distributed.Node.from_environment(request.nodes).writes


def score(request: QuantizeRequest, model_dir: Path, calibration, out_dir: Path, progress,
          placement: Placement = Placement("cpu"), budgets: tuple[float, ...] = ()) -> dict:
    """A size search's score stage (quant auto, ModelOpt): every format calibrated and every layer group scored once on
    `calibration`, saved as out_dir/SEARCH_STATE for each candidate budget's `run(..., search_state=)` to restore,
    and out_dir/SCORE_RECORD: what it cost and the frontier at `budgets` (auto_precision.frontier)."""
    from kiln.common.progress import quiet_libraries
    from kiln.quantize import modelopt_adapter

    refuse_nonfinite_weights(Path(model_dir))
    state = Path(out_dir) / SEARCH_STATE
    with quiet_libraries():
        try:
            facts = modelopt_backend.score(request, Path(model_dir), calibration, state, progress, placement)
            points = auto_precision.frontier(state, facts["weights"], request.auto.formats, budgets,
                                             modelopt_adapter.modelopt_config)
        finally:
            release_memory()
    record = {"formats": [q.value for q in request.auto.formats], "method": request.auto.method,
              "score_samples": request.auto.score_samples, "exclude": list(request.exclude),
              "calibration_samples": int(calibration.shape[0]), "calibration_seq_len": int(calibration.shape[1]),
              "tools": modelopt_backend.tool_versions(), **facts, "frontier": points}
    (Path(out_dir) / SCORE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def read_score(entry: Path) -> dict:
    """A score stage's record (SCORE_RECORD), as score() wrote it."""
    return json.loads((Path(entry) / SCORE_RECORD).read_text())


def require_backend(backend: Backend) -> None:
    """Refuse (UserInputError, with the fix) a backend whose tool this host lacks."""
    BACKENDS[backend].require()


def tool_versions(backend: Backend = Backend.modelopt) -> dict[str, str]:
    """The versions a variant's quantize stage depends on (its cache key): kiln's own packages for ModelOpt,
    those of llm-compressor's interpreter for llm-compressor."""
    return BACKENDS[backend].tool_versions()
