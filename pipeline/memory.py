"""Plan-time memory estimate: each stage's peak host and GPU memory, from config.json alone.

The numbers follow what the stages hold, fitted to bench/scale.py's peaks (0.17B-1.07B Llama, FP8):
- quantize: the source weights in the recipe's dtype and one calibration window's activations;
  then ModelOpt's exports, which hold the quantized state dict (linear layers at the format's
  bits, the rest at 16) and its serialised copy beside the model: weights + 2 x exported;
- validate: the baseline (stored 16-bit, float32 math), then the exported checkpoint as stored
  (never both), and a batch of float32 logits;
- every process: the interpreter, torch, transformers and ModelOpt (`RUNTIME_BYTES`).
On GPUs the weights go to the GPUs up to each one's cap and the rest to CPU memory (offload).
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln import validate
from kiln.quantize import FORMATS

RUNTIME_BYTES = int(0.6e9)   # fitted: peak = weights + 2 x exported + 0.6 GB at 0.17B-1.07B
GB = 1e9


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read from a Hugging Face config.json."""

    vocab: int
    hidden: int
    layers: int
    linear_params: int        # the decoder layers' linear weights: what the formats quantize
    other_params: int         # embeddings, output head, norms: kept in 16 bits
    max_hidden: int           # the widest activation (hidden or MLP width)

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    @property
    def params_label(self) -> str:
        return f"{self.params / 1e9:.2f}B" if self.params >= 1e9 else f"{self.params / 1e6:.1f}M"

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        text = config.get("text_config") or config   # multimodal configs nest the language model
        hidden, layers, vocab = text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]
        heads = text["num_attention_heads"]
        kv_heads = text.get("num_key_value_heads") or heads
        head_dim = text.get("head_dim") or hidden // heads
        attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
        experts = text.get("num_local_experts") or text.get("num_experts") or 0
        if experts:
            expert_width = text.get("moe_intermediate_size") or text["intermediate_size"]
            shared = text.get("shared_expert_intermediate_size") or 0
            mlp = 3 * hidden * (expert_width * experts + shared) + hidden * experts
            widest = max(expert_width, shared, hidden)
        else:
            mlp = 3 * hidden * text["intermediate_size"]
            widest = max(text["intermediate_size"], hidden)
        tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        other = vocab * hidden * (1 if tied else 2) + hidden * (2 * layers + 1)
        return cls(vocab, hidden, layers, layers * (attention + mlp), other, widest)


@dataclass(frozen=True)
class StageMemory:
    stage: str
    host_bytes: int
    gpu_bytes: int            # summed over the GPUs used
    detail: str


@dataclass(frozen=True)
class MemoryEstimate:
    shape: ModelShape
    stages: tuple[StageMemory, ...]
    host_total: int
    host_available: int
    gpu_caps: tuple[int, ...]   # per GPU, after the recipe's gpu_memory_fraction

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.host_bytes + s.gpu_bytes)

    def fits(self) -> bool:
        """Whether the largest stage fits this host's memory and GPU caps, with offload to CPU memory."""
        peak = self.peak
        return peak.host_bytes + peak.gpu_bytes <= self.host_total + sum(self.gpu_caps)

    def refusal(self, where: str) -> str | None:
        if self.fits():
            return None
        peak = self.peak
        gpus = f" and {len(self.gpu_caps)} GPU(s) with {sum(self.gpu_caps) / GB:.1f} GB usable" if self.gpu_caps \
            else " and no GPU"
        return (f"{where}: the model ({self.shape.params_label} parameters) needs about "
                f"{(peak.host_bytes + peak.gpu_bytes) / GB:.1f} GB at its peak ({peak.stage}: {peak.detail}), but this "
                f"host has {self.host_total / GB:.1f} GB of memory{gpus} (fix: build on a host with more memory or "
                "GPUs; `kiln plan` shows each stage's estimate)")

    def as_dict(self) -> dict:
        return {
            "params": self.shape.params,
            "host_total_bytes": self.host_total,
            "host_available_bytes": self.host_available,
            "gpu_caps_bytes": list(self.gpu_caps),
            "fits": self.fits(),
            "stages": [{"stage": s.stage, "host_bytes": s.host_bytes, "gpu_bytes": s.gpu_bytes, "detail": s.detail}
                       for s in self.stages],
        }


def _quantized_bytes(shape: ModelShape, weight_bits: float) -> int:
    return int(shape.linear_params * weight_bits / 8 + shape.other_params * 2)


def estimate(config: dict, dtype_bytes: int, formats, calibration_seq_len: int, evaluation_seq_len: int,
             host_total: int, host_available: int, gpu_caps: tuple[int, ...] = ()) -> MemoryEstimate:
    """Peak memory per stage for a model of this config.json, quantized to each of `formats` (QuantFormat).

    `gpu_caps` are the GPUs' usable bytes when calibration runs on them (empty on the CPU).
    """
    shape = ModelShape.from_config(config)
    weights = shape.params * dtype_bytes
    exported = max(_quantized_bytes(shape, FORMATS[f].weight_bits) for f in formats)
    # One window through the model: a few float activations of the widest layer, and the logits.
    calib_work = calibration_seq_len * (4 * shape.max_hidden * 4 + shape.vocab * dtype_bytes)
    # Validation (kiln.validate.heads): a block of float32 logits for the baseline and the variant, each with its
    # log-softmax and the KL's temporaries (about 6 blocks), the baseline's head weight kept beside the variant,
    # and a batch's activations.
    block = min(evaluation_seq_len, max(16, validate.LOGIT_BLOCK_BYTES // (4 * shape.vocab))) * shape.vocab * 4
    eval_work = 6 * block + shape.vocab * shape.hidden * dtype_bytes + evaluation_seq_len * 4 * shape.max_hidden * 4
    gpu_total = sum(gpu_caps)

    def split(on_device: int, host_only: int) -> tuple[int, int]:
        """(host, gpu): what fits the GPUs goes there, the rest is offloaded to CPU memory."""
        gpu = min(on_device, gpu_total)
        return RUNTIME_BYTES + host_only + on_device - gpu, gpu

    stages = []
    host, gpu = split(weights + calib_work, 0)
    stages.append(StageMemory("quantize (calibrate)", host, gpu,
                              f"{weights / GB:.2f} GB of weights + {calib_work / GB:.2f} GB of activations"))
    host, gpu = split(weights, 2 * exported)
    stages.append(StageMemory("quantize (export)", host, gpu,
                              f"{weights / GB:.2f} GB of weights + 2 x {exported / GB:.2f} GB exported state"))
    held = max(weights, exported)
    host, gpu = split(held, eval_work)
    stages.append(StageMemory("validate", host, gpu,
                              f"{held / GB:.2f} GB of one model + {eval_work / GB:.2f} GB of logit blocks and the "
                              "baseline's output head"))
    return MemoryEstimate(shape, tuple(stages), host_total, host_available, tuple(gpu_caps))


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of this host's memory."""
    import psutil

    memory = psutil.virtual_memory()
    return int(memory.total), int(memory.available)


def recipe_estimate(loaded, folder, host) -> MemoryEstimate | None:
    """The estimate for a recipe's model (config.json in `folder`) on this host, or None without a config.

    GPUs count only when `calibration.device` lets kiln use them; `host` is kiln.compile's Host
    (GPUs found through NVML or nvidia-smi, so planning never initialises CUDA).
    """
    import json
    from pathlib import Path

    if folder is None or not (Path(folder) / "config.json").is_file():
        return None
    recipe = loaded.recipe
    config = json.loads((Path(folder) / "config.json").read_text())
    caps: tuple[int, ...] = ()
    if recipe.calibration.device.value != "cpu":
        fraction = recipe.calibration.gpu_memory_fraction
        caps = tuple(int(g.memory_mib * 2**20 * fraction) for g in host.gpus if g.memory_mib)
    total, available = host_memory()
    # A calibration batch holds batch_size windows at once: its activations scale with their tokens.
    return estimate(config, 2, [q for v in recipe.variants.values() for q in v.quant_formats],
                    recipe.calibration.seq_len * recipe.calibration.batch_size,
                    recipe.evaluation.seq_len, total, available, caps)


def memory_table(estimate_: MemoryEstimate, title: str):
    from rich.table import Table

    table = Table(title=f"{title}: estimated peak memory ({estimate_.shape.params_label} parameters)",
                  title_justify="left")
    for column, justify in (("stage", "left"), ("host GB", "right"), ("GPU GB", "right"), ("what", "left")):
        table.add_column(column, justify=justify)
    for stage in estimate_.stages:
        table.add_row(stage.stage, f"{stage.host_bytes / GB:.2f}", f"{stage.gpu_bytes / GB:.2f}", stage.detail)
    gpus = f"{len(estimate_.gpu_caps)} GPU(s), {sum(estimate_.gpu_caps) / GB:.1f} GB usable" if estimate_.gpu_caps \
        else "no GPU used"
    verdict = "fits" if estimate_.fits() else "DOES NOT FIT"
    table.add_row("this host", f"{estimate_.host_total / GB:.2f}", f"{sum(estimate_.gpu_caps) / GB:.2f}",
                  f"{verdict}: {estimate_.host_available / GB:.1f} GB available now; {gpus}")
    return table
