"""llm-compressor's oneshot, run in the interpreter that has llm-compressor (KILN_LLMCOMPRESSOR_PYTHON).

`python -m kiln.quantize.llmcompressor_worker JOB.json`: the job names the source model, the
calibration token ids (a safetensors file), the modifiers and preset scheme, and where to save the
compressed-tensors checkpoint; the worker writes `result.json` beside the job (tool versions,
seconds, device). Only torch, transformers, datasets and llm-compressor are imported here: this
interpreter has none of kiln's other dependencies.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

TOOLS = ("llmcompressor", "compressed-tensors", "torch", "transformers")


@dataclass(frozen=True)
class OneshotJob:
    model_dir: str
    calibration: str                 # safetensors with "input_ids" [n, seq_len]
    out_dir: str                     # the HF checkpoint to write (compressed)
    modifiers: tuple[str, ...]       # "smoothquant", "gptq", "awq", in order
    scheme: str                      # compressed-tensors preset: W4A16, W4A16_ASYM, W8A8
    ignore: tuple[str, ...]          # module names or "re:" patterns kept unquantized
    dtype: str = "bfloat16"
    smoothing_strength: float | None = None
    max_shard_size: str = "5GB"
    trust_remote_code: bool = False

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


def _modifiers(job: OneshotJob) -> list:
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    quantizing = {"targets": ["Linear"], "scheme": job.scheme, "ignore": list(job.ignore)}
    made = {
        "smoothquant": lambda: SmoothQuantModifier(
            **({"smoothing_strength": job.smoothing_strength} if job.smoothing_strength is not None else {})),
        "gptq": lambda: GPTQModifier(**quantizing),
        "awq": lambda: AWQModifier(**quantizing),
    }
    return [made[name]() for name in job.modifiers]


def _without_pinned_memory_on_cpu_hosts() -> None:
    """llm-compressor 0.14's AWQ pins its cached activations for faster host-to-GPU copies, unconditionally;
    without an accelerator torch refuses ("Cannot access accelerator device when none is available").
    Pinning only speeds up copies to a GPU, so on a host without one it is skipped."""
    import torch

    if torch.cuda.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    if hasattr(IntermediatesCache, "_pin_intermediate"):
        IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)


def run(job: OneshotJob) -> dict:
    from importlib.metadata import version

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _without_pinned_memory_on_cpu_hosts()
    seconds = {}
    started = time.monotonic()
    ids = load_file(job.calibration)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(job.model_dir, dtype=getattr(torch, job.dtype),
                                                 trust_remote_code=job.trust_remote_code, use_safetensors=True)
    seconds["load"] = time.monotonic() - started
    started = time.monotonic()
    calibration = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    # Kiln's samples are already tokenized to one length and in a fixed order: no shuffling, no truncation.
    oneshot(model=model, dataset=calibration, recipe=_modifiers(job), max_seq_length=int(ids.shape[1]),
            num_calibration_samples=int(ids.shape[0]), shuffle_calibration_samples=False)
    seconds["calibrate"] = time.monotonic() - started
    started = time.monotonic()
    model.save_pretrained(job.out_dir, save_compressed=True, max_shard_size=job.max_shard_size)
    seconds["export"] = time.monotonic() - started
    return {"tools": {name: version(name) for name in TOOLS}, "seconds": seconds,
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def main(argv: list[str]) -> int:
    job_path = Path(argv[0])
    fields = json.loads(job_path.read_text())
    job = OneshotJob(**{**fields, "modifiers": tuple(fields["modifiers"]), "ignore": tuple(fields["ignore"])})
    result = run(job)
    (job_path.parent / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
