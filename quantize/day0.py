"""The day-0 path: a calibration-free format quantized straight from the source's safetensors shards.

No model is built and no calibration runs: the work is one read of every weight, ModelOpt's own quantization of
each linear (its quantizers and exporter, on a module holding just that weight), and one write. The output's
layout is fixed first (quantize/day0_plan.py), so workers (threads: torch and the writes release the GIL) take the
units in any order and write each tensor at its offset; memory holds the tensors in flight, never a shard.
The HF checkpoint is the ModelOpt path's, byte for byte (tests/test_day0.py); the TensorRT-LLM checkpoint is not
written (engine builds convert hf/ on the compile host, as for disk-offloaded builds).

With a `resume_dir`, each finished shard's digest is recorded as it completes, and a killed build resumes: a
recorded shard whose bytes still give its digest is kept, every other shard is written again.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from kiln.common.fsutil import atomic_write_text
from kiln.common.versions import installed_versions
from kiln.quantize.checkpoint import HF_DIR, CheckpointRecord, QuantizeRequest, save_tokenizer
from kiln.quantize.day0_plan import Day0Plan, DayZeroError, Unit, plan, write_index
from kiln.quantize.families import Family
from kiln.quantize.formats import AUTO, FORMATS, Backend, KVCacheFormat
from kiln.quantize.resume import DAY0_RECORD as RECORD
from kiln.quantize.source_check import refuse_nonfinite_tensor

TOOLS = ("nvidia-modelopt", "torch", "transformers")
SHARDS = "shards"


class QuantizePath(str, Enum):
    """A recipe's `quantize.path`: how a variant is quantized (what it makes is the same either way)."""

    auto = "auto"            # day0 where it makes everything the ModelOpt path would, else modelopt
    day0 = "day0"            # from the safetensors shards, tensor by tensor (calibration-free formats)
    modelopt = "modelopt"    # the model built, calibrated and exported by ModelOpt


def problem(quant, kv_cache: KVCacheFormat, algorithm: str | None = None, backend: Backend = Backend.modelopt,
            family: Family | None = None) -> str | None:
    """Why the day-0 path cannot make this format (None when it can); `family` None: the model is not at hand."""
    if backend is not Backend.modelopt:
        return f"backend {backend.value} quantizes in its own tool"
    if quant == AUTO:
        return "quant: auto scores each layer on calibration data"
    spec = FORMATS[quant]
    if not spec.calibration_free:
        return f"{quant.value} calibrates on data ({spec.algorithm} sets scales the weights alone do not give)"
    if algorithm is not None:
        return f"algorithm {algorithm} searches scales with ModelOpt's calibration"
    if kv_cache is not KVCacheFormat.none:
        return f"kv_cache {kv_cache.value} adds attention quantizers the day-0 path does not export"
    return model_problem(family)


def model_problem(family: Family | None) -> str | None:
    """Why the day-0 path cannot read a model of this family (None when it can, or when the family is unknown)."""
    if family is not None and family.experts is not None:
        return f"{family.title} is a mixture of experts (ModelOpt exports fused experts from the built model)"
    return None


def workers_for(requested: int | None) -> int:
    return requested or len(os.sched_getaffinity(0))


def quantize_group(config: dict, weights: dict, biases: dict, dtype) -> dict:
    """ModelOpt's quantization and export of linears that read one input: {module: weight} (and biases) in, the
    exported tensors ({module.weight, module.weight_scale, ...}) out. The modules sit at their names in a container,
    so the config's name patterns match as in the whole model."""
    import torch
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export.model_config import QUANTIZATION_FP8, QUANTIZATION_FP8_PB_REAL, QUANTIZATION_NONE
    from modelopt.torch.export.quant_utils import (get_quantization_format, postprocess_state_dict,
                                                   preprocess_linear_fusion)
    from modelopt.torch.export.unified_export_hf import _process_quantized_modules
    from torch import nn

    root = nn.Module()
    for name, weight in weights.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        linear = nn.Linear(1, 1, bias=False, device="meta")
        linear.in_features, linear.out_features = weight.shape[1], weight.shape[0]
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if name in biases:
            linear.bias = nn.Parameter(biases[name], requires_grad=False)
        parent.add_module(leaf, linear)
    with torch.no_grad():   # ModelOpt's prints: quantize.run holds stdout in quiet_libraries
        mtq.quantize(root, config, forward_loop=None)   # max and "none" calibrate weights alone without one
        modules = [root.get_submodule(name) for name in weights]
        # ModelOpt's export unifies shared scales of linears that read one input, except for these formats.
        if len(modules) > 1 and get_quantization_format(modules[0]) not in (QUANTIZATION_FP8, QUANTIZATION_NONE,
                                                                            QUANTIZATION_FP8_PB_REAL):
            preprocess_linear_fusion(modules)
        _process_quantized_modules(root, dtype)
        return postprocess_state_dict(root.state_dict(), 448, None)


@dataclass
class _Shards:
    """The output shards being filled: their files, what each still waits for, and the resume record."""

    plan: Day0Plan
    folder: Path
    record_path: Path | None
    done: dict[str, str]          # finished shard -> digest

    def __post_init__(self):
        self.lock = threading.Lock()
        self.pending = {s.file: set(s.slots) for s in self.plan.shards if s.file not in self.done}
        self.digests: dict[str, dict[str, str]] = {file: {} for file in self.pending}
        self.handles = {}
        for shard in self.plan.shards:
            if shard.file in self.pending:
                path = self.folder / shard.file
                if not path.is_file() or path.stat().st_size != shard.size:
                    shard.create(self.folder)
                else:   # a file left by a killed build: its header is rewritten, every slot below
                    with open(path, "r+b") as handle:
                        handle.write(shard.header)
                self.handles[shard.file] = os.open(path, os.O_WRONLY)
        self.shard_of = self.plan.shard_of()

    def place(self, unit: Unit) -> tuple[int, int]:
        """Where a unit's largest output lands: taken in this order, the units write each file front to back (and
        read the source, whose files safetensors also sorts by name, front to back too)."""
        largest = max(unit.outputs, key=lambda name: self.shard_of[name].slots[name].nbytes)
        shard = self.shard_of[largest]
        return self.plan.shards.index(shard), shard.slots[largest].start

    def wanted(self, unit: Unit) -> bool:
        return any(self.shard_of[name].file in self.pending for name in unit.outputs)

    def write(self, name: str, tensor) -> None:
        import torch

        shard = self.shard_of[name]
        if shard.file not in self.pending:
            return
        slot = shard.slots[name]
        data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        if len(data) != slot.nbytes:
            raise RuntimeError(f"day-0: {name} came out as {len(data)} bytes where the plan has {slot.nbytes}")
        fd = self.handles[shard.file]
        os.pwrite(fd, data, slot.start)
        digest = hashlib.sha256(data).hexdigest() if self.record_path else ""
        with self.lock:
            self.digests[shard.file][name] = digest
            self.pending[shard.file].discard(name)
            if not self.pending[shard.file]:
                self._finish(shard)

    def _finish(self, shard) -> None:
        del self.pending[shard.file]
        os.close(self.handles.pop(shard.file))
        if self.record_path is not None:
            self.done[shard.file] = shard_digest(shard, self.digests.pop(shard.file))
            atomic_write_text(self.record_path, json.dumps({"plan": self.plan.digest, "shards": self.done,
                                                            "total": len(self.plan.shards)},
                                                           indent=2, sort_keys=True) + "\n")

    def close(self) -> None:
        for handle in self.handles.values():
            os.close(handle)


def shard_digest(shard, tensor_digests: dict[str, str]) -> str:
    """A shard's digest: its header and its tensors' sha256, in file order."""
    return hashlib.sha256(shard.header + "".join(tensor_digests[n] for n in shard.slots).encode()).hexdigest()


def digest_on_disk(shard, path: Path) -> str:
    with open(path, "rb") as handle:
        if handle.read(len(shard.header)) != shard.header:
            return ""
        return shard_digest(shard, {name: hashlib.sha256(os.pread(handle.fileno(), slot.nbytes, slot.start)).hexdigest()
                                    for name, slot in shard.slots.items()})


def _trusted_shards(plan_: Day0Plan, resume_dir: Path, progress, label: str) -> dict[str, str]:
    """The shards a killed build finished whose bytes still give their recorded digests."""
    record_path = resume_dir / RECORD
    if not record_path.is_file():
        return {}
    record = json.loads(record_path.read_text())
    if record.get("plan") != plan_.digest:
        progress.log(f"{label}: the day-0 shards left by a killed build were planned differently; writing all again")
        return {}
    kept = {}
    for shard in plan_.shards:
        digest = record["shards"].get(shard.file)
        if digest is None:
            continue
        if digest_on_disk(shard, resume_dir / SHARDS / shard.file) == digest:
            kept[shard.file] = digest
        else:
            progress.log(f"{label}: {shard.file} does not match the digest recorded when it was written; "
                         "writing it again")
    if kept:
        progress.log(f"{label}: day-0 resumes with {len(kept)} of {len(plan_.shards)} shards kept")
    return kept


def run(request: QuantizeRequest, model_dir: Path, out_dir: Path, progress, family: Family,
        resume_dir: Path | None = None, workers: int | None = None) -> CheckpointRecord:
    """hf/ and kiln.json for `request` from the safetensors in `model_dir`, by `workers` threads (default: the
    host's cores)."""
    import torch
    from kiln.quantize import modelopt_adapter as adapter

    reason = problem(request.quant, request.kv_cache, request.algorithm, request.backend, family)
    if reason:
        raise DayZeroError(f"the day-0 path cannot make {request.label}: {reason} (fix: quantize.path: modelopt)")
    started = time.monotonic()
    label = f"{request.label} (day-0)"
    dtype = getattr(torch, adapter.TORCH_DTYPES[request.dtype])
    config = adapter.modelopt_config(request.quant, request.kv_cache, request.group_size, exclude=request.exclude,
                                     only=request.only)
    with progress.task(f"plan {label}", total=None):
        layout = plan(Path(model_dir), config, dtype, request.trust_remote_code, request.max_shard_size, quantize_group)
    seconds = {"plan": time.monotonic() - started}
    hf = Path(out_dir) / HF_DIR
    hf.mkdir(parents=True, exist_ok=True)
    folder = hf
    done: dict[str, str] = {}
    if resume_dir is not None:
        folder = Path(resume_dir) / SHARDS
        folder.mkdir(parents=True, exist_ok=True)
        done = _trusted_shards(layout, Path(resume_dir), progress, label)
    count = workers_for(workers)
    shards = _Shards(layout, folder, Path(resume_dir) / RECORD if resume_dir is not None else None, dict(done))
    units = sorted((u for u in layout.units if shards.wanted(u)), key=shards.place)
    began = time.monotonic()
    try:
        _quantize_units(units, layout, config, dtype, shards, count, progress, label)
    finally:
        shards.close()
    seconds["quantize"] = time.monotonic() - began
    if folder != hf:
        for shard in layout.shards:
            os.replace(folder / shard.file, hf / shard.file)
    _write_configs(layout, hf)
    save_tokenizer(model_dir, hf, request.trust_remote_code)
    seconds["total"] = time.monotonic() - started
    spec = FORMATS[request.quant]
    read = sum(os.path.getsize(f) for f in {s.path for s in layout.sources.values()})
    record = CheckpointRecord(
        quant=request.quant.value, kv_cache=request.kv_cache.value, algorithm=spec.algorithm,
        group_size=request.group_size or spec.default_group_size, dtype=request.dtype, tp_size=request.tp_size,
        calibration_samples=0, calibration_seq_len=0, tools=installed_versions(TOOLS),
        seconds={k: round(v, 3) for k, v in seconds.items()},
        export_quant_algo=layout.quant_config["quantization"].get("quant_algo"), exclude=list(request.exclude),
        only=list(request.only), placement={"device": "cpu"}, family=family.model_type, trtllm_checkpoint=False,
        day0={"workers": count, "shards": len(layout.shards), "kept_shards": len(done), "units": len(layout.units),
              "bytes_read": read, "bytes_written": sum(s.size for s in layout.shards)},
    )
    record.write(out_dir, model_dir)
    return record


def _quantize_units(units: list[Unit], layout: Day0Plan, config: dict, dtype, shards: _Shards, count: int,
                    progress, label: str) -> None:
    """Each unit read, quantized and written by one of `count` threads; one more unit waits than there are threads,
    so host memory holds about count + 1 units' tensors."""
    import torch

    files = {path: os.open(path, os.O_RDONLY) for path in {s.path for s in layout.sources.values()}}

    def work(unit: Unit) -> None:
        tensors = {}
        for name in unit.tensors:
            stored = layout.sources[name]
            tensors[name] = stored.read(files[stored.path])
            refuse_nonfinite_tensor(stored.path, name, tensors[name])
        if not unit.modules:
            name, = unit.tensors
            shards.write(name, tensors[name].to(getattr(torch, layout.dtypes[name])))
            return
        weights = {m: tensors[f"{m}.weight"].to(dtype) for m in unit.modules}
        biases = {m: tensors[f"{m}.bias"].to(dtype) for m in unit.modules if f"{m}.bias" in tensors}
        del tensors
        for name, tensor in quantize_group(config, weights, biases, dtype).items():
            shards.write(name, tensor)

    try:
        with progress.task(f"quantize {label}: {len(units)} units, {count} workers", total=len(units)) as task, \
                ThreadPoolExecutor(count, thread_name_prefix="kiln-day0") as pool:
            queue, running = list(reversed(units)), set()
            while queue or running:
                while queue and len(running) < count + 1:
                    running.add(pool.submit(work, queue.pop()))
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    future.result()   # a worker's error stops the build here
                    task.advance()
    finally:
        for fd in files.values():
            os.close(fd)


def _write_configs(layout: Day0Plan, hf: Path) -> None:
    """config.json, generation_config.json and hf_quant_config.json as save_pretrained and ModelOpt's exporter write
    them for the built model (the meta skeleton carries the same config), and the shard index."""
    from modelopt.torch.export.unified_export_hf import _sanitize_generation_config_for_save, _write_hf_export_config

    skeleton = layout.skeleton
    skeleton.config.dtype = str(skeleton.dtype).split(".")[1]
    skeleton.config.architectures = [type(skeleton).__name__]
    skeleton.config.save_pretrained(hf)
    if skeleton.can_generate():
        _sanitize_generation_config_for_save(skeleton)
        skeleton.generation_config.save_pretrained(hf)
    _write_hf_export_config(skeleton, layout.quant_config, hf)
    write_index(layout, hf)

