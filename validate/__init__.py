"""Validate stage: measure the accuracy of what ships.

Public entry points:
  Baseline(model_dir, scratch, trust_remote_code)   the unquantized model's logits, computed once per build
  run(hf_dir, baseline, samples, progress) -> Metrics
  evaluate_gates(metrics, **gates) -> GateResult
  check_engine(target, sm_dir, hf_dir, model_dir, samples, progress, label) -> Metrics   (GPU hosts)
  check_vllm(hf_dir, model_dir, samples, progress, label, max_model_len) -> VllmReport   (where vLLM is installed)
  vllm_build() -> "absent" | "cpu:<version>" | "<version>"   the vLLM in KILN_VLLM_PYTHON
  vllm_kv_cache_bytes(config, max_model_len)   the KV cache vLLM is given on CPUs (the check, kiln serve)
  load_reference_model(hf_dir, trust_remote_code) -> model   the exported checkpoint as validation runs it
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from kiln.validate.engine_check import check_engine
from kiln.validate.gates import GateResult, evaluate_gates
from kiln.validate.records import Metrics
from kiln.validate.vllm_check import VllmReport, check_vllm, vllm_build, vllm_kv_cache_bytes

STAGE_VERSION = 1
TOOLS = ("torch", "transformers", "compressed-tensors")
REPORT = "report.json"

__all__ = ["Baseline", "run", "check_engine", "load_reference_model", "evaluate_gates", "GateResult", "Metrics",
           "load_metrics", "REPORT", "STAGE_VERSION", "TOOLS", "VllmReport", "check_vllm", "vllm_build",
           "vllm_kv_cache_bytes"]


def load_reference_model(hf_dir: Path, trust_remote_code: bool = False):
    """The exported checkpoint in its transformers architecture, weights kept as stored and decoded per layer
    (what validation measured; kiln serve's CPU runtime generates with it). Imports torch on first use."""
    from kiln.validate.runtime import load_reference_model as load

    return load(Path(hf_dir), trust_remote_code)


class Baseline:
    """The unquantized model's logits on the evaluation samples, computed once and shared by variants.

    The model is loaded as stored (16-bit) with float32 math, runs every sample once, and is released
    before any variant is loaded: validation never holds two models. The logits (float32, exact) go
    to files in `scratch`, one per sample, and are read back one at a time, so an 8B model with a
    128k vocabulary does not keep gigabytes of logits in memory.
    """

    def __init__(self, model_dir: Path, scratch: Path, trust_remote_code: bool = False, allow_pickle: bool = False,
                 placement=None):
        self.model_dir = Path(model_dir)
        self.scratch = Path(scratch)
        self.placement = placement
        self.trust_remote_code = trust_remote_code
        self.allow_pickle = allow_pickle
        self._files: dict[bytes, Path] = {}

    def logits(self, samples, progress=None):
        """A function i -> the baseline's float32 logits [seq, vocab] for samples[i]."""
        import torch

        key = samples.numpy().tobytes()
        if key not in self._files:
            self._files[key] = self._compute(samples, progress)
        folder = self._files[key]

        def for_sample(i: int):
            return torch.load(folder / f"{i}.pt", weights_only=True)

        return for_sample

    def has(self, samples) -> bool:
        return samples.numpy().tobytes() in self._files

    def compute_from(self, model, samples, progress=None) -> None:
        """The logits from a source model someone else loaded (the quantize stage, before calibration), so the
        weights are read from disk once for both. The model is given back unchanged. Skipped when some of
        its weights are offloaded (accelerate hooks fetch them per module; the baseline then loads itself)."""
        if self.has(samples) or any(p.is_meta for p in model.parameters()) or model.dtype != self._stored_dtype():
            return   # offloaded, or loaded in another dtype than stored: the baseline loads itself
        from kiln.validate.runtime import float32_math_view

        with float32_math_view(model):
            self._files[samples.numpy().tobytes()] = self._compute(samples, progress, model)

    def _stored_dtype(self):
        """The dtype the source's config.json says its weights are stored in (what the baseline runs on)."""
        import torch

        config = json.loads((self.model_dir / "config.json").read_text())
        name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
        return getattr(torch, name, None) if isinstance(name, str) else None

    def _compute(self, samples, progress, model=None) -> Path:
        import gc

        import torch

        from kiln.common.progress import quiet_libraries
        from kiln.validate.metrics import batched_logits
        from kiln.validate.runtime import load_baseline_model, place

        folder = self.scratch / f"baseline-{len(self._files)}"
        folder.mkdir(parents=True)
        loaded_here = model is None
        if loaded_here:
            with quiet_libraries():
                model = load_baseline_model(self.model_dir, self.trust_remote_code, self.allow_pickle)
                if self.placement is not None:
                    model = place(model, self.placement)
        task = progress.task("evaluate baseline", total=len(samples)) if progress else contextlib.nullcontext()
        with task as bar:
            for i, logits in batched_logits(model, samples):
                torch.save(logits.clone(), folder / f"{i}.pt")
                if progress:
                    bar.advance()
        if loaded_here:
            del model
            gc.collect()
        return folder


def run(hf_dir: Path, baseline: Baseline, samples, progress, label: str = "", trust_remote_code: bool = False,
        placement=None) -> Metrics:
    """Load the exported checkpoint in the reference runtime and compare it with the baseline.

    `placement` (kiln.quantize.Placement, or None for the CPU) says where the models run.
    """
    from kiln.common.progress import quiet_libraries
    from kiln.validate.metrics import compare
    from kiln.validate.runtime import load_reference_model, place

    reference = baseline.logits(samples, progress)  # before the variant loads: one model at a time
    with quiet_libraries():
        model = load_reference_model(hf_dir, trust_remote_code)
        if placement is not None:
            model = place(model, placement)
        with progress.task(f"evaluate {label}".strip(), total=len(samples)) as task:
            metrics = compare(reference, model, samples, task.advance)
        del model   # not left to this frame's lifetime (see kiln.quantize._run)
    return metrics


def write_metrics(metrics: Metrics, out_dir: Path) -> None:
    (Path(out_dir) / REPORT).write_text(json.dumps(metrics.as_dict(), indent=2, sort_keys=True) + "\n")


def load_metrics(out_dir: Path) -> Metrics:
    return Metrics(**json.loads((Path(out_dir) / REPORT).read_text()))
