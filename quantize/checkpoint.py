"""What a quantize backend is asked for and what it leaves beside the checkpoint (kiln.json), shared by
the backends (modelopt_backend, llmcompressor_backend) and read by the stages after them."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kiln.quantize.formats import AUTO, FORMATS, Backend, KVCacheFormat, QuantFormat

CHECKPOINT_RECORD = "kiln.json"
SOURCE_CONFIG = "source-config.json"   # the source model's config.json, verbatim: compile hands it to TensorRT-LLM
HF_DIR = "hf"
# model.dtype: the bytes of one weight as the model is loaded (what the plan's memory estimate counts).
MODEL_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
TRTLLM_DIR = "trtllm"
# The module-name patterns ModelOpt 0.47 leaves 16-bit whatever the format (its _default_disabled_quantizer_cfg,
# matched against "<module>.weight_quantizer"; tests/test_structure.py holds it equal): routers, output heads,
# vision towers. A recipe's format skipping any other layer is a fault the structure checks name.
UNQUANTIZED_BY_DEFAULT = (
    "*block_sparse_moe.gate*", "*linear_attn.conv1d*", "*self_attention.conv1d*", "*linear_attn.in_proj_a*",
    "*linear_attn.in_proj_b*", "*lm_head*", "*mixer.conv1d*", "*mlp.gate.*", "*mlp.shared_expert_gate.*",
    "*output_layer*", "*proj_out.*", "*router*", "mtp.*", "output.*", "*embed_vision*", "*vision_tower*", "*visual*",
    "*vision_model*", "*multi_modal_projector*",
)


@dataclass(frozen=True)
class AutoRequest:
    """One auto-precision build: the formats a layer may take, the budget in kiln's bits per decoder weight
    (quantize/size.py), ModelOpt's scoring method (kl_div | gradient) and how many calibration windows score."""

    formats: tuple[QuantFormat, ...]
    effective_bits: float
    method: str
    score_samples: int


@dataclass(frozen=True)
class QuantizeRequest:
    quant: QuantFormat | str        # a format, or "auto" with `auto` set
    kv_cache: KVCacheFormat
    group_size: int | None
    dtype: str
    tp_size: int
    trust_remote_code: bool = False
    allow_pickle: bool = False
    alpha: float | None = None
    exclude: tuple[str, ...] = ()   # module name patterns kept unquantized
    only: tuple[str, ...] = ()      # when set, the only module name patterns quantized (exclude still applies)
    algorithm: str | None = None    # one of the format's `algorithms` (None: its default)
    max_shard_size: str = "5GB"     # the HF export's largest safetensors file
    calibration_batch_size: int = 1  # samples per calibration forward pass
    backend: Backend = Backend.modelopt
    auto: AutoRequest | None = None
    # Mixture-of-experts: every token through every expert while calibrating (ModelOpt's moe_calib_experts_ratio 1.0).
    all_experts: bool = False
    # The day-0 path (quantize/day0.py): from the safetensors shards, no model built and no calibration.
    day0: bool = False
    # Ranks that calibrate, each on its share of the windows (quantize/distributed.py); 1: this process alone.
    processes: int = 1
    # Hosts that calibrate together, `processes` ranks each (quantize/distributed.py); node 0 writes.
    nodes: int = 1

    @property
    def ranks(self) -> int:
        return self.processes * self.nodes

    @property
    def formats(self) -> tuple[QuantFormat, ...]:
        """The formats its checkpoint may hold: the one asked for, or those auto precision mixes."""
        return self.auto.formats if self.auto else (QuantFormat(self.quant),)

    @property
    def engine_checkpoint(self) -> bool:
        """Whether ModelOpt's TensorRT-LLM export makes an engine-flow checkpoint for every format it may hold (and
        for the scale search asked for)."""
        search = FORMATS[self.quant].algorithms.get(self.algorithm) if self.algorithm else None
        return (all(FORMATS[q].trtllm is None or FORMATS[q].trtllm.engine_checkpoint for q in self.formats)
                and (search is None or search.engine_checkpoint))

    @property
    def label(self) -> str:
        """What progress lines call it: fp8, or auto 5.5b."""
        if self.auto:
            return f"auto {self.auto.effective_bits:g}b"
        return getattr(self.quant, "value", self.quant) + (f" {self.algorithm}" if self.algorithm else "")


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
    only: list[str] = field(default_factory=list)   # the only module patterns quantized ([]: every linear)
    # Where it was calibrated: {"device": "cpu" | "cuda", "gpus": [names], "peak_gpu_memory_bytes": {gpu: bytes}}.
    placement: dict = field(default_factory=dict)
    # The family-table row (model_type) and whether a TensorRT-LLM checkpoint (trtllm/) was written:
    # families without one publish the HF checkpoint for TensorRT-LLM's PyTorch backend only.
    family: str | None = None
    trtllm_checkpoint: bool = True
    backend: str = Backend.modelopt.value   # what made it: modelopt | llmcompressor (compressed-tensors, no trtllm/)
    # quant "auto": every linear layer of the export and the format it took ("none": kept 16-bit), as the
    # exported config says; and the search's numbers (requested and measured bits per weight, method, formats).
    layer_formats: dict[str, str] = field(default_factory=dict)
    auto: dict | None = None
    # Mixture-of-experts: per MoE block, the calibration tokens its router sent each expert on the first calibration
    # pass (quantize/expert_tokens.py); all_experts: whether every token also went through every expert.
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    all_experts: bool = False
    # Resumable calibration (quantize/resume.py): {"layers": n, "resumed_from_layer": k} (k = 0: it ran through);
    # None when calibration saved no per-layer checkpoints.
    layer_checkpoints: dict | None = None
    # The day-0 path (quantize/day0.py): {"workers", "shards", "kept_shards", "units", "bytes_read",
    # "bytes_written"}; None when ModelOpt built and calibrated the model.
    day0: dict | None = None
    # Calibrated across processes (quantize/distributed.py): {"processes", "backend", "samples_per_rank"}.
    distributed: dict | None = None

    @property
    def quant_formats(self) -> tuple[QuantFormat, ...]:
        return recorded_formats(self.quant, self.layer_formats)

    @classmethod
    def load(cls, checkpoint_dir: Path) -> "CheckpointRecord":
        return cls(**json.loads((Path(checkpoint_dir) / CHECKPOINT_RECORD).read_text()))

    def write(self, out_dir: Path, model_dir: Path) -> None:
        """kiln.json, and the source config.json beside it (what compile hands TensorRT-LLM)."""
        shutil.copyfile(Path(model_dir) / "config.json", Path(out_dir) / SOURCE_CONFIG)
        (Path(out_dir) / CHECKPOINT_RECORD).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")


def recorded_formats(quant: str, layer_formats: dict[str, str]) -> tuple[QuantFormat, ...]:
    """The formats a checkpoint's layers hold, from its kiln.json: its one format, or the distinct formats
    auto precision chose."""
    if quant != AUTO:
        return (QuantFormat(quant),)
    return tuple(QuantFormat(q) for q in sorted(set(layer_formats.values()) - {"none"}))


def save_tokenizer(model_dir: Path, dest: Path, trust_remote_code: bool) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code).save_pretrained(dest)


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
