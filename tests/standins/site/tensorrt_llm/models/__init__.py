"""Stand-in for tensorrt_llm.models.MODEL_MAP and the config classes' from_hugging_face.

Each class below returns what TensorRT-LLM's own from_hugging_face returns for a Hugging Face
config.json, read as TensorRT-LLM 1.2's pinned transformers (4.57) reads it: attributes are the
config.json keys, with 4.57's defaults. Only the fields kiln compares are produced; each cites
the line of TensorRT-LLM it stands for. An architecture MODEL_MAP lacks raises KeyError, as there.
$KILN_STANDIN_TRTLLM_OVERRIDE (JSON) replaces fields of the result, to test kiln's refusal.
"""
import json
import os
from pathlib import Path


def _read(hf_config_or_dir) -> dict:
    return json.loads((Path(hf_config_or_dir) / "config.json").read_text())


class _Config:
    def __init__(self, fields: dict):
        self._fields = {**fields, **json.loads(os.environ.get("KILN_STANDIN_TRTLLM_OVERRIDE") or "{}")}

    def to_dict(self) -> dict:
        return dict(self._fields)


def _common(hf: dict, dtype: str, mapping, head_size: int, rotary_base: float, norm_epsilon: float) -> dict:
    return {
        "architecture": hf["architectures"][0], "dtype": dtype,
        "num_hidden_layers": hf["num_hidden_layers"], "num_attention_heads": hf["num_attention_heads"],
        "hidden_size": hf["hidden_size"], "intermediate_size": hf["intermediate_size"],
        "num_key_value_heads": hf.get("num_key_value_heads", hf["num_attention_heads"]),
        "head_size": head_size, "vocab_size": hf["vocab_size"],
        "max_position_embeddings": hf["max_position_embeddings"], "norm_epsilon": norm_epsilon,
        "rotary_base": rotary_base, "rotary_scaling": hf.get("rope_scaling"),
        "mapping": mapping.to_dict(),
    }


class LLaMAConfig:
    @classmethod
    def from_hugging_face(cls, hf_config_or_dir, dtype="auto", mapping=None, quant_config=None, **kwargs):
        hf = _read(hf_config_or_dir)
        # tensorrt_llm/models/llama/config.py LLaMAConfig.from_hugging_face:
        #   head_dim = getattr(hf_config, "head_dim", hidden_size // num_attention_heads)
        #   head_size = getattr(hf_config, "kv_channels", head_dim)
        head_size = hf.get("kv_channels", hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
        fields = _common(hf, dtype, mapping, head_size,
                         hf.get("rope_theta", 10000.0),             # getattr(hf_config, "rope_theta", 10000.0)
                         hf["rms_norm_eps"])                        # norm_epsilon = hf_config.rms_norm_eps
        fields["hidden_act"] = hf["hidden_act"]                     # hidden_act = hf_config.hidden_act
        fields["attn_bias"] = bool(hf.get("bias") or hf.get("attention_bias", False))  # getattr bias or attention_bias
        return _Config(fields)


class QWenConfig:
    @classmethod
    def from_hugging_face(cls, hf_config_or_dir, dtype="auto", mapping=None, quant_config=None, **kwargs):
        hf = _read(hf_config_or_dir)
        # tensorrt_llm/models/qwen/config.py QWenConfig.from_hugging_face:
        qwen_type = hf["model_type"]                                 # qwen_type = hf_config.model_type
        head_size = hf.get("kv_channels", hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
        fields = _common(hf, dtype, mapping, head_size,
                         hf.get("rope_theta", 100000.0),            # getattr(hf_config, "rope_theta", 100000.0)
                         hf["rms_norm_eps"])
        fields.update({
            "qwen_type": qwen_type,
            "attn_bias": qwen_type not in ("qwen3", "qwen3_moe"),    # "Qwen3 models have no attn bias"
            "hidden_act": "swiglu" if qwen_type in ("qwen2_moe", "qwen3_moe") else hf.get("hidden_act", "silu"),
            "seq_length": hf.get("seq_length", 8192),
            "use_logn_attn": hf.get("use_logn_attn", False),
            "moe_intermediate_size": hf.get("moe_intermediate_size", 0),
            "moe_shared_expert_intermediate_size": hf.get("shared_expert_intermediate_size", 0),
            # MoeConfig(num_experts, top_k, normalization_mode=NONE).to_dict()
            "moe": {"num_experts": hf.get("num_experts", 0), "shared_expert_intermediate_size": 0,
                    "top_k": hf.get("num_experts_per_tok", 0), "normalization_mode": 0,
                    "sparse_mixer_epsilon": 0.01, "tp_mode": 0},
        })
        return _Config(fields)


class _Model:
    def __init__(self, config_class):
        self.config_class = config_class

    def from_hugging_face(self, hf_model_or_dir, dtype="auto", mapping=None, quant_config=None, **kwargs):
        """The model class's from_hugging_face for a pre-quantized HF checkpoint: records what kiln handed it;
        save_checkpoint writes the config TensorRT-LLM would and placeholder rank weights."""
        from tensorrt_llm import record

        allowed = {"load_model_on_cpu", "trust_remote_code", "use_preloading"}
        if set(kwargs) - allowed:
            raise TypeError(f"from_hugging_face got unexpected arguments {sorted(set(kwargs) - allowed)}")
        record({"tool": "from_hugging_face", "hf_dir": str(hf_model_or_dir), "dtype": dtype,
                "mapping": {**mapping.to_dict(), "rank": mapping.rank}, "quant_config": quant_config.to_dict(),
                "kwargs": kwargs, "config_json": _read(hf_model_or_dir)})
        config = self.config_class.from_hugging_face(hf_model_or_dir, dtype=dtype, mapping=mapping).to_dict()
        return _Converted(config, quant_config, mapping.rank, Path(hf_model_or_dir))


class _Converted:
    def __init__(self, config: dict, quant_config, rank: int, hf_dir: Path):
        self.config, self.quant_config, self.rank, self.hf_dir = config, quant_config, rank, hf_dir

    def save_checkpoint(self, output_dir, save_config=True):
        out = Path(output_dir)
        weights = sorted(p.name for p in self.hf_dir.glob("*.safetensors"))
        (out / f"rank{self.rank}.safetensors").write_bytes(
            f"kiln stand-in: rank {self.rank} of {', '.join(weights)}\n".encode())
        if save_config:
            quant = self.quant_config.to_dict()
            config = {**self.config, "quantization": quant,
                      # where the stand-in trtllm-build finds the HF export for its "engine's" logits: the folder
                      # kiln's view of hf/ links its weights from (the view goes with the compile stage)
                      "standin_hf_export": str(next(self.hf_dir.glob("*.safetensors")).resolve().parent)}
            (out / "config.json").write_text(json.dumps(config, indent=2))


# tensorrt_llm/models/__init__.py MODEL_MAP (the rows kiln's family table uses; Qwen3-MoE has none there).
MODEL_MAP = {
    "LlamaForCausalLM": _Model(LLaMAConfig),
    "MistralForCausalLM": _Model(LLaMAConfig),
    "MixtralForCausalLM": _Model(LLaMAConfig),
    "Qwen2ForCausalLM": _Model(QWenConfig),
    "Qwen3ForCausalLM": _Model(QWenConfig),
}
