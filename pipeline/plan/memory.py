"""Plan-time memory estimate: each stage's peak host and GPU memory, from config.json alone.

The numbers follow what the stages hold, fitted to bench/scale.py's peaks (0.17B-1.07B Llama, FP8):
- quantize: the source weights in the recipe's dtype and one calibration window's activations;
  then ModelOpt's exports, which hold the quantized state dict (linear layers at the format's
  bits, the rest at 16) and its serialised copy beside the model: weights + 2 x exported;
- validate: the baseline (stored 16-bit, float32 math), then the exported checkpoint as stored
  (never both), and a batch of float32 logits;
- every process: the interpreter, torch, transformers and ModelOpt (`RUNTIME_BYTES`).
On GPUs the weights go to the GPUs up to each one's cap and the rest to CPU memory (offload).
Under `calibration.offload: disk` host memory holds the weights up to the recipe's budget and one decoder layer
read from disk at a time; validation holds the embeddings, the head, one layer and the evaluation batch's
hidden states (kiln.validate.layerwise).
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln import validate
from kiln.quantize import FORMATS
from kiln.quantize.formats import LAYER_BY_LAYER_UNDER_OFFLOAD, REWRITES_WEIGHTS

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
    disk_bytes: int = 0       # weights read from disk as their layer runs (offload: disk)


@dataclass(frozen=True)
class DiskOffload:
    """What `calibration.offload: disk` sets: the host budget for weights, and what the estimate needs besides."""

    host_budget: int          # bytes of weights kept in host memory (max_host_memory, or the host less a reserve)
    evaluation_tokens: int    # samples x seq_len: their hidden states stay resident between layers
    shard_bytes: int          # the streaming exporter buffers one shard before writing it
    writes_folder: bool       # the source must be converted first (dtype, or not safetensors): it goes to the folder
    folder_free: int          # free bytes on the offload folder's filesystem
    calibration_tokens: int = 0   # samples x seq_len: GPTQ, a layer at a time, keeps every window's layer inputs


@dataclass(frozen=True)
class MemoryEstimate:
    shape: ModelShape
    stages: tuple[StageMemory, ...]
    host_total: int
    host_available: int
    gpu_caps: tuple[int, ...]   # per GPU, after the recipe's gpu_memory_fraction
    offload: DiskOffload | None = None
    folder_bytes: int = 0       # what the offload folder receives: converted weights, layers calibration rewrote
    folder_holds: str = ""      # which of those, in words

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.host_bytes + s.gpu_bytes)

    def fits(self) -> bool:
        """Whether the largest stage fits this host's memory and GPU caps, with offload to CPU memory (or, under
        disk offload, its resident set fits the host and the offload folder's disk what it writes)."""
        if self.offload is not None:
            return self._offload_refusal("") is None
        peak = self.peak
        return peak.host_bytes + peak.gpu_bytes <= self.host_total + sum(self.gpu_caps)

    def refusal(self, where: str) -> str | None:
        if self.offload is not None:
            return self._offload_refusal(where)
        if self.fits():
            return None
        peak = self.peak
        gpus = f" and {len(self.gpu_caps)} GPU(s) with {sum(self.gpu_caps) / GB:.1f} GB usable" if self.gpu_caps \
            else " and no GPU"
        return (f"{where}: the model ({self.shape.params_label} parameters) needs about "
                f"{(peak.host_bytes + peak.gpu_bytes) / GB:.1f} GB at its peak ({peak.stage}: {peak.detail}), but this "
                f"host has {self.host_total / GB:.1f} GB of memory{gpus} (fix: build on a host with more memory or "
                "GPUs; `kiln plan` shows each stage's estimate, or set calibration.offload: disk)")

    def _offload_refusal(self, where: str) -> str | None:
        peak = max(self.stages, key=lambda s: s.host_bytes)
        if peak.host_bytes > self.host_total:
            return (f"{where}: under calibration.offload: disk the smallest resident set still needs about "
                    f"{peak.host_bytes / GB:.2f} GB of host memory ({peak.stage}: {peak.detail}), but this host has "
                    f"{self.host_total / GB:.2f} GB (fix: lower calibration.max_host_memory, evaluation.samples or "
                    "seq_len, or build on a host with more memory)")
        if self.folder_bytes > self.offload.folder_free:
            return (f"{where}: disk offload writes {self.folder_bytes / GB:.2f} GB ({self.folder_holds}) to "
                    f"KILN_HOME/tmp, whose "
                    f"filesystem has {self.offload.folder_free / GB:.2f} GB free (fix: free space there, point "
                    "KILN_HOME at a larger disk, or store the source as safetensors in model.dtype so that accelerate "
                    "reads it in place)")
        return None

    def as_dict(self) -> dict:
        return {
            "params": self.shape.params,
            "host_total_bytes": self.host_total,
            "host_available_bytes": self.host_available,
            "gpu_caps_bytes": list(self.gpu_caps),
            "fits": self.fits(),
            "offload": None if self.offload is None else {
                "host_budget_bytes": self.offload.host_budget, "writes_folder": self.offload.writes_folder,
                "folder_bytes": self.folder_bytes, "folder_free_bytes": self.offload.folder_free},
            "stages": [{"stage": s.stage, "host_bytes": s.host_bytes, "gpu_bytes": s.gpu_bytes,
                        "disk_bytes": s.disk_bytes, "detail": s.detail} for s in self.stages],
        }


def _quantized_bytes(shape: ModelShape, weight_bits: float) -> int:
    return int(shape.linear_params * weight_bits / 8 + shape.other_params * 2)


def estimate(config: dict, dtype_bytes: int, formats, calibration_seq_len: int, evaluation_seq_len: int,
             host_total: int, host_available: int, gpu_caps: tuple[int, ...] = (),
             offload: DiskOffload | None = None) -> MemoryEstimate:
    """Peak memory per stage for a model of this config.json, quantized to each of `formats` (QuantFormat).

    `gpu_caps` are the GPUs' usable bytes when calibration runs on them (empty on the CPU).
    """
    shape = ModelShape.from_config(config)
    if offload is not None:
        return _offloaded(shape, dtype_bytes, formats, calibration_seq_len, evaluation_seq_len, host_total,
                          host_available, tuple(gpu_caps), offload)
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


def _offloaded(shape: ModelShape, dtype_bytes: int, formats, calibration_seq_len: int, evaluation_seq_len: int,
               host_total: int, host_available: int, gpu_caps: tuple[int, ...], offload: DiskOffload) -> MemoryEstimate:
    """Each stage's resident host memory and the weights it reads from disk under offload: disk."""
    weights = shape.params * dtype_bytes
    layer = shape.linear_params // shape.layers * dtype_bytes             # one decoder layer as loaded
    edges = shape.other_params * dtype_bytes                              # embeddings, head, norms
    on_gpus = min(weights, sum(gpu_caps))
    in_host = min(weights - on_gpus, max(offload.host_budget, 0))
    on_disk = weights - on_gpus - in_host
    # A source read in place is memory-mapped: the weights kept in host memory are file pages, which the kernel
    # drops and reads again under pressure, not resident memory. Converted ones are (measured on a 1.07B model
    # under a memory cgroup: 0.54 GB of weights in host memory, 0.90 GB resident while exporting).
    resident_weights = in_host if offload.writes_folder else 0
    kept = (f"{in_host / GB:.2f} GB of weights in host memory" if offload.writes_folder
            else f"{in_host / GB:.2f} GB of weights memory-mapped")
    exported_layer = max(_quantized_bytes(shape, FORMATS[f].weight_bits) for f in formats) // max(shape.layers, 1)
    calib_work = calibration_seq_len * (4 * shape.max_hidden * 4 + shape.vocab * dtype_bytes)
    block = min(evaluation_seq_len, max(16, validate.LOGIT_BLOCK_BYTES // (4 * shape.vocab))) * shape.vocab * 4
    hidden_states = 2 * offload.evaluation_tokens * shape.hidden * 4      # every sample's, into and out of a layer
    decoded = 4 * shape.hidden * shape.max_hidden                         # its widest linear, decoded to float32
    shard = min(offload.shard_bytes, exported_layer * shape.layers)
    disk = f", {on_disk / GB:.2f} GB read from disk" if on_disk else ""
    algorithms = {FORMATS[f].algorithm for f in formats}
    layer_state, state = 0, ""
    if algorithms & LAYER_BY_LAYER_UNDER_OFFLOAD:
        # GPTQ a layer at a time: the layer's Hessians (in_features^2 float32 per linear: six read the hidden
        # state, one the MLP's) and every calibration window's inputs to the layer and outputs from it.
        hessians = 4 * (6 * shape.hidden ** 2 + shape.max_hidden ** 2)
        layer_state = hessians + 2 * offload.calibration_tokens * shape.hidden * dtype_bytes
        state = f" + {layer_state / GB:.2f} GB of one layer's GPTQ Hessians and inputs"
    # A rewritten layer is read back from its written-back files (anonymous memory, its bytes) and rewritten in a
    # float32 working copy (twice them), while calibrating and again while folding and exporting. Fitted: INT4-AWQ
    # on the 1.07B Llama measured 0.87 / 1.22 GB of anonymous memory calibrating / exporting, against 0.73 /
    # 1.03 GB estimated without this term.
    rewrite = 3 * layer if algorithms & REWRITES_WEIGHTS else 0
    rewritten = f" + {rewrite / GB:.2f} GB of the layer being rewritten" if rewrite else ""
    # A 4-bit weight decodes through an unpacked copy and a scaled float32 temporary beside its float32 result
    # (measured: 1.30 GB validating that INT4-AWQ checkpoint against 1.23 estimated with one decoded copy).
    decoded *= 3 if min(FORMATS[f].weight_bits for f in formats) < 8 else 1
    stages = (
        StageMemory("quantize (calibrate)",
                    RUNTIME_BYTES + resident_weights + layer + calib_work + layer_state + rewrite, on_gpus,
                    f"{kept} + one {layer / GB:.3f} GB layer{disk} + {calib_work / GB:.2f} GB of "
                    f"activations{state}{rewritten}", on_disk),
        StageMemory("quantize (export)", RUNTIME_BYTES + resident_weights + layer + 2 * exported_layer + shard + rewrite,
                    on_gpus, f"{kept} + one layer exported + a {shard / GB:.2f} GB shard buffer{disk}{rewritten}",
                    on_disk),
        StageMemory("validate (layer by layer)", RUNTIME_BYTES + edges + layer + decoded + hidden_states + 6 * block, 0,
                    f"{edges / GB:.2f} GB of embeddings and head + one layer (and {decoded / GB:.3f} GB decoded) + "
                    f"{hidden_states / GB:.2f} GB of hidden states + logit blocks", weights - edges),
    )
    # Converted weights go to the folder before calibration; rewritten layers go back there (offload_writeback).
    writes = [what for what, written in (("converted weights", offload.writes_folder),
                                          ("the layers calibration rewrites", algorithms & REWRITES_WEIGHTS)) if written]
    return MemoryEstimate(shape, stages, host_total, host_available, gpu_caps, offload, len(writes) * on_disk,
                          " and ".join(writes))


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of this host's memory, or of this process's memory cgroup where that is lower."""
    from kiln.quantize.placement import host_memory as usable

    return usable()


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
                    recipe.evaluation.seq_len, total, available, caps, disk_offload(recipe, Path(folder), config, available))


def disk_offload(recipe, folder, config: dict, available: int) -> DiskOffload | None:
    """The recipe's disk offload as the estimate needs it, or None when it does not offload to disk."""
    import shutil

    from pydantic import ByteSize, TypeAdapter

    from kiln.common.scratch import kiln_home
    from kiln.quantize.placement import host_budget

    calibration = recipe.calibration
    if calibration.offload.value != "disk":
        return None
    budget = host_budget(calibration.max_host_memory, available)
    stored = config.get("dtype") or config.get("torch_dtype")
    in_place = stored == recipe.model.dtype and any(folder.glob("*.safetensors"))
    home = kiln_home()
    while not home.exists():
        home = home.parent
    return DiskOffload(int(budget), recipe.evaluation.samples * recipe.evaluation.seq_len,
                       int(TypeAdapter(ByteSize).validate_python(recipe.build.max_shard_size)), not in_place,
                       shutil.disk_usage(home).free, calibration.samples * calibration.seq_len)


def memory_table(estimate_: MemoryEstimate, title: str):
    from rich.table import Table

    table = Table(title=f"{title}: estimated peak memory ({estimate_.shape.params_label} parameters)",
                  title_justify="left")
    offload = estimate_.offload
    columns = (("stage", "left"), ("host GB", "right"), ("GPU GB", "right"),
               *((("disk GB", "right"),) if offload else ()), ("what", "left"))
    for column, justify in columns:
        table.add_column(column, justify=justify)
    for stage in estimate_.stages:
        disk = (f"{stage.disk_bytes / GB:.2f}",) if offload else ()
        table.add_row(stage.stage, f"{stage.host_bytes / GB:.2f}", f"{stage.gpu_bytes / GB:.2f}", *disk, stage.detail)
    gpus = f"{len(estimate_.gpu_caps)} GPU(s), {sum(estimate_.gpu_caps) / GB:.1f} GB usable" if estimate_.gpu_caps \
        else "no GPU used"
    verdict = "fits" if estimate_.fits() else "DOES NOT FIT"
    budget = (f"; weights in host memory capped at {offload.host_budget / GB:.2f} GB, the rest read from disk "
              + ("(converted into KILN_HOME/tmp first)" if offload.writes_folder else "in place from the source's "
                 "safetensors")) if offload else ""
    table.add_row("this host", f"{estimate_.host_total / GB:.2f}", f"{sum(estimate_.gpu_caps) / GB:.2f}",
                  *((f"{offload.folder_free / GB:.0f} free",) if offload else ()),
                  f"{verdict}: {estimate_.host_available / GB:.1f} GB available now; {gpus}{budget}")
    return table
