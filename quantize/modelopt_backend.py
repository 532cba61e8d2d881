"""Backend modelopt: NVIDIA ModelOpt calibrates in this process and exports the HF checkpoint (hf/) and, for
families with a TensorRT-LLM checkpoint, trtllm/ (checked and completed by trtllm_checks)."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kiln.common.allocator import freed_memory_returned, freeze_imported_objects
from kiln.common.versions import installed_versions
from kiln.quantize import auto_precision
from kiln.quantize.expert_tokens import ExpertTokens, every_expert_calibrated
from kiln.quantize.checkpoint import (
    HF_DIR, TRTLLM_DIR, CheckpointRecord, QuantizeRequest, release_memory, save_tokenizer,
)
from kiln.quantize.families import Family
from kiln.quantize.formats import FORMATS, MIXED_PRECISION, KVCacheFormat, kv_calibration_note
from kiln.quantize.offload_writeback import write_back_to_disk
from kiln.quantize.placement import Placement, gpu_peak_bytes, reset_gpu_peaks
from kiln.quantize.resume import LayerCheckpoints, Resumed
from kiln.quantize.size import checkpoint_size
from kiln.quantize.trtllm_checks import MIXED_LAYER_CONFIG, ExportCheckError, check_trtllm_checkpoint

TOOLS = ("nvidia-modelopt", "torch", "transformers")


def tool_versions() -> dict[str, str]:
    return installed_versions(TOOLS)


def require() -> None:
    """ModelOpt is kiln's own dependency: nothing to refuse."""


def run(request: QuantizeRequest, model_dir: Path, calibration, out_dir: Path, progress, placement: Placement,
        on_loaded, family: Family, source_config: dict, resume_dir: Path | None = None,
        search_state: Path | None = None, ranks=None) -> CheckpointRecord | None:
    """`resume_dir`: where calibration keeps per-layer checkpoints that a killed build resumes from;
    `search_state`: a size search's saved scores (the score stage's), which quant auto restores instead of
    calibrating and scoring again; `ranks`: the distributed.RankGroup this process is one rank of (it calibrates on
    its share, and only the writing rank exports: the others return None)."""
    with _offload_scratch(placement) as offload_folder:
        return _run(request, model_dir, calibration, out_dir, progress, placement, on_loaded, family, source_config,
                    offload_folder, resume_dir, search_state, ranks)


def score(request: QuantizeRequest, model_dir: Path, calibration, search_state: Path, progress,
          placement: Placement) -> dict:
    """A size search's score stage: every format of `request.auto` calibrated and every layer group scored once,
    saved as ModelOpt's search checkpoint at `search_state` for each candidate budget to restore. Returns what
    the frontier needs of the model (its linear weights, as ModelOpt counts them) and what it cost."""
    from kiln.quantize import modelopt_adapter as adapter

    with _offload_scratch(placement) as offload_folder:
        facts = _Facts(f"auto {'+'.join(q.value for q in request.auto.formats)}")
        model = _load(adapter, request, model_dir, placement, offload_folder, None, progress, facts)
        started = time.monotonic()
        facts.linear_layers = auto_precision.decoder_linear_layers(model)
        # Any feasible budget: the score stage keeps the scores, each candidate solves its own.
        search = _search(adapter, model, request, calibration, progress, facts, search_state, budget_bits=16.0)
        facts.seconds["calibrate_and_score"] = time.monotonic() - started
        weights = auto_precision.linear_weights(model)
        del model
    return {"weights": weights, "forwards": search["forwards"],
            "seconds": {k: round(v, 3) for k, v in facts.seconds.items()}}


@contextlib.contextmanager
def _offload_scratch(placement: Placement):
    """Under disk offload: a folder of this process's scratch (KILN_HOME/tmp), removed when the stage ends, and by
    the next kiln if this process is killed (kiln.common.scratch); None otherwise."""
    offload_folder = Path(tempfile.mkdtemp(prefix="kiln-offload-")) if placement.to_disk else None
    try:
        yield offload_folder
    finally:
        if offload_folder is not None:
            shutil.rmtree(offload_folder, ignore_errors=True)


@dataclass
class _Facts:
    """What the steps of one quantize run learn, for its record."""

    label: str
    seconds: dict = field(default_factory=dict)
    on_disk: list[str] = field(default_factory=list)   # modules disk offload reads as they run
    written_back: list = field(default_factory=list)   # rewritten layers sent back to the offload folder
    linear_layers: list[str] = field(default_factory=list)
    search: dict = field(default_factory=dict)         # quant auto's summary
    expert_tokens: dict = field(default_factory=dict)  # MoE: tokens per expert on the first calibration pass
    resumed: Resumed | None = None                     # where a killed calibration's checkpoints picked up
    layer_checkpoints: dict | None = None              # kiln.json's record of them
    trtllm: bool = False                               # a TensorRT-LLM checkpoint was exported
    distributed: dict | None = None                    # calibrated across processes: distributed.RankGroup.record


def _run(request: QuantizeRequest, model_dir: Path, calibration, out_dir: Path, progress, placement: Placement,
         on_loaded, family: Family, source_config: dict, offload_folder: Path | None,
         resume_dir: Path | None, search_state: Path | None, ranks=None) -> CheckpointRecord | None:
    """load -> calibrate -> export -> record."""
    # ModelOpt and torch load here, when a variant is quantized: a cached build never imports them.
    from kiln.quantize import modelopt_adapter as adapter

    facts = _Facts(request.label + (f"+kv {request.kv_cache.value}" if request.kv_cache != KVCacheFormat.none else ""))
    model = _load(adapter, request, model_dir, placement, offload_folder, on_loaded, progress, facts)
    started = time.monotonic()
    facts.linear_layers = auto_precision.decoder_linear_layers(model)
    with ranks.gptq_hessians_shared() if ranks else contextlib.nullcontext():
        facts.search = _calibrate(adapter, model, request, ranks.share(calibration) if ranks else calibration,
                                  progress, facts, bool(facts.on_disk), resume_dir, search_state)
    facts.seconds["calibrate"] = time.monotonic() - started
    if ranks is not None:
        facts.expert_tokens = ranks.leave(facts.expert_tokens)
        facts.distributed = ranks.record(calibration)
        if not ranks.writes:
            return None
    # Calibration's freed activations and fake-quantized weights stay with glibc otherwise, under the export's peak
    # (measured on the 1.07B model after INT4-AWQ: 2.4 GB of 4.7 GB anonymous memory was free heap).
    release_memory()
    with freed_memory_returned():   # packing frees each 16-bit weight as it goes: back to the OS, not the heap
        _export(adapter, model, request, model_dir, out_dir, family, placement, progress, facts)
    del model   # before the record reads the exports back
    record = _record(request, model_dir, calibration, out_dir, placement, offload_folder, family, source_config, facts)
    record.write(out_dir, model_dir)
    return record


def _load(adapter, request: QuantizeRequest, model_dir: Path, placement: Placement, offload_folder: Path | None,
          on_loaded, progress, facts: _Facts):
    """The source model, placed (and its offloaded layers that calibration rewrites written back to the folder);
    `on_loaded` sees it before calibration changes it."""
    started = time.monotonic()
    reset_gpu_peaks(placement)
    adapter.import_modelopt()   # before the model exists: see there why
    freeze_imported_objects()
    model = adapter.load_source_model(model_dir, request.dtype, request.trust_remote_code, request.allow_pickle,
                                      placement, offload_folder)
    facts.seconds["load"] = time.monotonic() - started
    facts.on_disk = adapter.on_disk(model)
    # Max calibration hands back the weights it read (ModelOpt writes them back all the same: accelerate's loader
    # keeps those as the file-backed tensors safetensors gave); rewritten weights would be new host memory.
    rewrites = request.auto is None and FORMATS[request.quant].rewrites_weights
    facts.written_back = write_back_to_disk(model, offload_folder) if facts.on_disk and rewrites else []
    if placement.to_disk:
        # transformers sets no hf_device_map when everything landed on the CPU: the model fit the budget.
        modules = len(getattr(model, "hf_device_map", None) or {})
        budget = f"host budget {placement.max_memory['cpu'] / 2**20:.0f} MiB"
        progress.log(f"disk offload: {len(facts.on_disk)} of {modules} modules read from disk as they run ({budget})"
                     if facts.on_disk else f"disk offload: the model fits the {budget}; nothing is read from disk")
    if on_loaded is not None:
        started = time.monotonic()
        on_loaded(model)
        release_memory()   # what on_loaded computed with is gone before calibration grows the heap again
        facts.seconds["before_calibration"] = time.monotonic() - started
    return model


def _export(adapter, model, request: QuantizeRequest, model_dir: Path, out_dir: Path, family: Family,
            placement: Placement, progress, facts: _Facts) -> None:
    """hf/ with the tokenizer, and trtllm/ for a family and format TensorRT-LLM's engine flow has a checkpoint for."""
    started = time.monotonic()
    # Under disk offload only the HF checkpoint is written, streamed a layer at a time; ModelOpt's TensorRT-LLM
    # exporter needs the whole state dict (TensorRT-LLM reads the HF checkpoint on the compile host instead).
    facts.trtllm = family.trtllm is not None and not placement.to_disk and request.engine_checkpoint
    with progress.task(f"export {facts.label}", total=3 if facts.trtllm else 2) as task:
        if facts.on_disk and adapter.fold_input_scales_layer_by_layer(model):
            progress.log(f"{facts.label}: pre-quant scales folded a decoder layer at a time, rewritten layers kept on disk")
        adapter.export_hf(model, out_dir / HF_DIR, request.max_shard_size, offloaded=bool(facts.on_disk))
        task.advance()
        save_tokenizer(model_dir, out_dir / HF_DIR, request.trust_remote_code)
        task.advance()
        if facts.trtllm:
            adapter.export_trtllm(model, out_dir / TRTLLM_DIR, request.dtype, request.tp_size)
            task.advance()
    facts.seconds["export"] = time.monotonic() - started


def _record(request: QuantizeRequest, model_dir: Path, calibration, out_dir: Path, placement: Placement,
            offload_folder: Path | None, family: Family, source_config: dict, facts: _Facts) -> CheckpointRecord:
    """The exports checked (TensorRT-LLM's derived fields, a mix's layer formats and budget) and kiln.json's record."""
    corrections = (check_trtllm_checkpoint(out_dir / TRTLLM_DIR, source_config, request.tp_size, facts.label)
                   if facts.trtllm else [])
    auto = request.auto
    layer_formats, auto_record = {}, None
    if auto is not None:
        _check_mixed_export(out_dir, source_config, family if facts.trtllm else None, facts.label)
        layer_formats = auto_precision.read_layer_formats(out_dir / HF_DIR, facts.linear_layers, auto.formats)
        measured = auto_precision.check_budget(checkpoint_size(out_dir / HF_DIR, model_dir), auto)
        auto_record = {"formats": [q.value for q in auto.formats], "effective_bits": auto.effective_bits,
                       "measured_bits": measured, "method": auto.method, "score_samples": auto.score_samples,
                       **facts.search}
    spec = FORMATS[request.quant] if auto is None else None
    return CheckpointRecord(
        quant=getattr(request.quant, "value", request.quant),
        kv_cache=request.kv_cache.value,
        algorithm=(request.algorithm or spec.algorithm) if spec else f"auto_quantize:{auto.method}",
        group_size=(request.group_size or spec.default_group_size) if spec else None,
        dtype=request.dtype,
        tp_size=request.tp_size,
        calibration_samples=int(calibration.shape[0]),
        calibration_seq_len=int(calibration.shape[1]),
        tools=installed_versions(TOOLS),
        trtllm_corrections=[c.as_dict() for c in corrections],
        seconds={k: round(v, 3) for k, v in facts.seconds.items()},
        export_quant_algo=json.loads((out_dir / HF_DIR / "hf_quant_config.json").read_text())["quantization"].get("quant_algo"),
        alpha=request.alpha,
        exclude=list(request.exclude),
        only=list(request.only),
        placement={**placement.record(), "peak_gpu_memory_bytes": gpu_peak_bytes(placement), "on_disk": facts.on_disk,
                   # what accelerate converted into the folder (0 when it reads the source's safetensors in place)
                   # and the layers calibration or export rewrote (AWQ, GPTQ, SmoothQuant), which wait there
                   "offload_folder_bytes": sum(f.stat().st_size for f in offload_folder.rglob("*") if f.is_file())
                   if offload_folder else 0,
                   "written_back_bytes": sum(w.bytes_written for w in facts.written_back)},
        family=family.model_type,
        trtllm_checkpoint=facts.trtllm,
        layer_formats=layer_formats,
        auto=auto_record,
        expert_tokens=facts.expert_tokens,
        all_experts=request.all_experts,
        layer_checkpoints=facts.layer_checkpoints,
        distributed=facts.distributed,
    )


def _check_mixed_export(out_dir: Path, source_config: dict, family: Family | None, label: str) -> None:
    """A mixed checkpoint's two exports give each decoder layer the same format."""
    hf = json.loads((out_dir / HF_DIR / "hf_quant_config.json").read_text())
    if family is None or not family.trtllm or hf["quantization"].get("quant_algo") != MIXED_PRECISION:
        return
    trt_config = json.loads((out_dir / TRTLLM_DIR / MIXED_LAYER_CONFIG).read_text())
    problems = auto_precision.trtllm_disagreements(hf, trt_config, source_config["num_hidden_layers"])
    if problems:
        raise ExportCheckError(f"{label}: the HF and TensorRT-LLM exports disagree on layer formats: "
                               + "; ".join(problems[:4]) + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""))


def _calibrate(adapter, model, request: QuantizeRequest, calibration, progress, facts: _Facts,
               offloaded: bool, resume_dir: Path | None, search_state: Path | None) -> dict:
    """Calibrate with one format's config (counting each MoE expert's tokens), or search the formats per layer
    (quant auto: from the score stage's `search_state` where given) and then calibrate the KV cache; returns the
    search's summary (empty for one format)."""
    label = facts.label
    batch_size = request.calibration_batch_size
    kv_note = kv_calibration_note(request.kv_cache)
    if kv_note:
        progress.log(f"{label}: {kv_note}")
    if request.auto is None:
        checkpoints = _layer_checkpoints(adapter, model, resume_dir, label, progress, facts)
        config = adapter.modelopt_config(request.quant, request.kv_cache, request.group_size, request.alpha,
                                         request.exclude, offloaded, request.only, request.algorithm,
                                         request.all_experts, checkpoints)
        # A scale search fake-quantizes as it calibrates: on a CPU kiln's rounding stands in for ModelOpt's CUDA ops.
        stand_in = auto_precision.block_formats_on_cpu if request.algorithm else contextlib.nullcontext
        tokens = ExpertTokens(model, first_pass=-(-len(calibration) // batch_size))
        try:
            widened = every_expert_calibrated(model) if request.all_experts else contextlib.nullcontext()
            with stand_in(), widened:
                if checkpoints is None:
                    _calibrate_whole_model(adapter, model, config, calibration, batch_size, label, progress)
                else:
                    _calibrate_layer_by_layer(adapter, model, config, calibration, batch_size, checkpoints, tokens,
                                              facts, progress)
        finally:
            tokens.close()
        facts.expert_tokens = tokens.table()
        return {}
    if search_state is None:
        search = _search(adapter, model, request, calibration, progress, facts, None)
    else:
        # ModelOpt may write the checkpoint it restores from: it gets a copy, never the score stage's entry.
        with tempfile.TemporaryDirectory(prefix="kiln-search-") as scratch:
            state = Path(scratch) / auto_precision.SEARCH_STATE
            shutil.copyfile(search_state, state)
            search = _search(adapter, model, request, calibration, progress, facts, state)
    if request.kv_cache is not KVCacheFormat.none:
        with progress.task(f"{'set' if kv_note else 'calibrate'} the {request.kv_cache.value} KV cache", total=None):
            adapter.calibrate_kv_cache(model, request.kv_cache, calibration, batch_size)
    return search


def _search(adapter, model, request: QuantizeRequest, calibration, progress, facts: _Facts,
            search_state: Path | None, budget_bits: float | None = None) -> dict:
    """ModelOpt's auto_quantize: calibrate every format and score each layer group, or (a `search_state` file that
    exists) restore both and only solve the budget. Its summary says how many forward passes it ran."""
    batch_size = request.calibration_batch_size
    formats = "+".join(q.value for q in request.auto.formats)
    restoring = search_state is not None and search_state.exists()
    if restoring:
        forwards, description = None, f"auto precision: solve {facts.label} from the saved scores"
    else:
        batches, score_batches = -(-len(calibration) // batch_size), -(-request.auto.score_samples // batch_size)
        forwards = auto_precision.search_forwards(facts.linear_layers, request.exclude, len(request.auto.formats),
                                                  batches, score_batches, request.auto.method)
        description = f"auto precision: calibrate {formats}, then score each layer"
    done = 0
    with progress.task(description, total=forwards) as task:
        def on_forward():   # ModelOpt may run a few more forwards than counted: the bar stops at its end
            nonlocal done
            done += 1
            if forwards is not None and done <= forwards:
                task.advance()

        search = adapter.auto_quantize(model, request.auto, request.exclude, calibration, batch_size, on_forward,
                                       search_state, budget_bits)
    return {**search, "forwards": done, **({"restored": done == 0} if restoring else {})}


def _calibrate_whole_model(adapter, model, config: dict, calibration, batch_size: int, label: str, progress) -> None:
    with progress.task(f"calibrate {label}", total=len(calibration)) as task:
        # AWQ's later passes search scales on the statistics the first one took
        adapter.calibrate(model, config, calibration, task.advance, batch_size,
                          on_pass=lambda n: task.restart(f"calibrate {label} (pass {n})"))


def _layer_checkpoints(adapter, model, resume_dir: Path | None, label: str, progress, facts: _Facts):
    """The calibration's per-layer checkpoints when the build is resumable and ModelOpt can calibrate this model a
    layer at a time, after checking what a killed run left there."""
    if resume_dir is None:
        return None
    layers = adapter.decoder_layers(model)
    if layers is None:
        progress.log(f"{label}: not resumable (ModelOpt finds no decoder layers to calibrate one at a time)")
        return None
    checkpoints = LayerCheckpoints(resume_dir)
    facts.resumed = checkpoints.start(progress.log)
    facts.layer_checkpoints = {"layers": layers, "resumed_from_layer": facts.resumed.layer if facts.resumed else 0}
    if facts.resumed is not None:
        progress.log(f"{label}: calibration resumes from layer {facts.resumed.layer} of {layers} "
                     "(every recorded layer's digests verified)")
    return checkpoints


def _calibrate_layer_by_layer(adapter, model, config: dict, calibration, batch_size: int,
                              checkpoints: LayerCheckpoints, tokens: ExpertTokens, facts: _Facts, progress) -> None:
    """ModelOpt's layer-at-a-time calibration, each layer saved as it completes; kiln records the digests (and its
    expert counts) at every boundary, where ModelOpt calls the forward loop again."""
    if facts.resumed is not None:
        tokens.restore(facts.resumed.state)
    done = facts.layer_checkpoints["resumed_from_layer"]
    with progress.task(f"calibrate {facts.label}, a layer at a time", total=facts.layer_checkpoints["layers"]) as task:
        task.advance(done)

        def at_boundary() -> None:
            nonlocal done
            recorded = checkpoints.boundary(tokens.state())
            task.advance(max(recorded - done, 0))
            done = max(done, recorded)

        adapter.calibrate(model, config, calibration, lambda n: None, batch_size, at_each_pass=at_boundary)
