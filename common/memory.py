"""What memory estimates share across stages: a model's shape from its config.json, one stage's peak, the disk
offload a recipe sets, and where weights sit (GPUs, host memory, disk). Each stage owns its own formula
(kiln.quantize.peak_memory, kiln.validate.peak_memory); kiln.pipeline.plan.memory adds them up for a host."""

from __future__ import annotations

from dataclasses import dataclass

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


def on_gpus_first(on_device: int, host_only: int, gpu_caps: tuple[int, ...]) -> tuple[int, int]:
    """(host, gpu) bytes: what fits the GPUs goes there, the rest is offloaded to CPU memory; every process
    carries the interpreter, torch, transformers and ModelOpt (RUNTIME_BYTES)."""
    gpu = min(on_device, sum(gpu_caps))
    return RUNTIME_BYTES + host_only + on_device - gpu, gpu


@dataclass(frozen=True)
class OffloadedWeights:
    """Where the weights sit under `calibration.offload: disk`, and the layer a stage reads at a time."""

    weights: int      # all of them, in the recipe's dtype
    layer: int        # one decoder layer as loaded
    edges: int        # embeddings, head, norms
    on_gpus: int
    in_host: int
    on_disk: int
    resident: int     # of in_host, what is resident memory: converted weights (a source read in place is mapped)
    kept: str         # in words
    disk: str         # ", N GB read from disk", or nothing

    @classmethod
    def of(cls, shape: ModelShape, dtype_bytes: int, gpu_caps: tuple[int, ...], offload: DiskOffload) -> "OffloadedWeights":
        weights = shape.params * dtype_bytes
        on_gpus = min(weights, sum(gpu_caps))
        in_host = min(weights - on_gpus, max(offload.host_budget, 0))
        on_disk = weights - on_gpus - in_host
        # A source read in place is memory-mapped: the weights kept in host memory are file pages, which the kernel
        # drops and reads again under pressure, not resident memory. Converted ones are (measured on a 1.07B model
        # under a memory cgroup: 0.54 GB of weights in host memory, 0.90 GB resident while exporting).
        kept = (f"{in_host / GB:.2f} GB of weights in host memory" if offload.writes_folder
                else f"{in_host / GB:.2f} GB of weights memory-mapped")
        return cls(weights, shape.linear_params // shape.layers * dtype_bytes, shape.other_params * dtype_bytes,
                   on_gpus, in_host, on_disk, in_host if offload.writes_folder else 0, kept,
                   f", {on_disk / GB:.2f} GB read from disk" if on_disk else "")
