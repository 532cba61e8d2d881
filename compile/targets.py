"""What the compile stage is asked to build: the target kinds and one typed request.

Light on purpose (no torch, no TensorRT): the recipe schema and `kiln plan` import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path


class Target(str, Enum):
    trtllm_engine = "trtllm-engine"     # TensorRT engines from `trtllm-build` (TensorRT-LLM 0.17 to 1.2)
    trtllm_pytorch = "trtllm-pytorch"   # the HF checkpoint + LLM-API options (TensorRT-LLM 1.0+)


# trtllm-build --lora_target_modules choices (TensorRT-LLM LoraManager.LORA_MODULE_IDS, dense-model subset).
LORA_MODULES = ("attn_qkv", "attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate",
                "mlp_gate_up")
# trtllm-build --speculative_decoding_mode choices that need nothing beyond the target model's checkpoint.
SPECULATIVE_MODES = ("draft_tokens_external", "lookahead_decoding")

# Per-SM folder inside an artifact, and the files kiln writes there.
SM_DIR = "engines"
ENGINE_RECORD = "engine.json"
CHECK_REPORT = "validation.json"
LLM_API_OPTIONS = "llm_api_options.yaml"


@dataclass(frozen=True)
class CompileRequest:
    """Everything the compile stage needs besides the checkpoint folder; part of the stage key."""

    target: Target
    sm: str
    tp_size: int
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    kv_cache_reuse: bool = False
    free_gpu_memory_fraction: float = 0.9
    cuda_graph_batch_sizes: tuple[int, ...] | None = None
    lora_target_modules: tuple[str, ...] = ()
    max_lora_rank: int = 64
    speculative_mode: str | None = None
    max_draft_len: int = 0

    def key_config(self) -> dict:
        config = dict(self.__dict__)
        config["target"] = self.target.value
        for name in ("cuda_graph_batch_sizes", "lora_target_modules"):
            config[name] = list(config[name]) if config[name] is not None else None
        return config


@dataclass(frozen=True)
class CheckpointQuant:
    """What the exported checkpoint says about its quantization, as TensorRT-LLM will read it."""

    quant_algo: str | None
    kv_cache_quant_algo: str | None
    tp_size: int

    @classmethod
    def of_trtllm(cls, trtllm_dir: Path) -> "CheckpointQuant":
        config = json.loads((Path(trtllm_dir) / "config.json").read_text())
        quant = config.get("quantization") or {}
        mapping = config.get("mapping") or {}
        return cls(quant.get("quant_algo"), quant.get("kv_cache_quant_algo"), int(mapping.get("tp_size", 1)))

    @classmethod
    def of_hf(cls, hf_dir: Path, tp_size: int) -> "CheckpointQuant":
        path = Path(hf_dir) / "hf_quant_config.json"
        quant = json.loads(path.read_text()).get("quantization", {}) if path.is_file() else {}
        return cls(quant.get("quant_algo"), quant.get("kv_cache_quant_algo"), tp_size)
