"""kiln's check of exported TensorRT-LLM configs: correct what the source proves, refuse the rest."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from kiln.quantize.trtllm_checks import ExportCheckError, check_trtllm_checkpoint

SOURCE = {
    "model_type": "llama", "hidden_act": "silu",
    "architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2,
    "num_key_value_heads": 1, "num_hidden_layers": 1, "vocab_size": 64, "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    # transformers 5 keeps RoPE here; ModelOpt's export then dropped rotary_base/rotary_scaling.
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
}


def _exported(tmp_path, int4: bool, qkv_bias: bool = False, **overrides):
    config = {
        "architecture": "LlamaForCausalLM", "hidden_act": "silu", "attn_bias": False, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2,
        "num_key_value_heads": 1, "num_hidden_layers": 1, "vocab_size": 64, "max_position_embeddings": 512,
        "norm_epsilon": 1e-5, "head_size": 64, "share_embedding_table": False, "use_parallel_embedding": True,
        "embedding_sharding_dim": 0, "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": {"quant_algo": "W4A16_AWQ" if int4 else "FP8"},
    }
    config.update(overrides)
    pack = 2 if int4 else 1
    dtype = torch.int8 if int4 else torch.float8_e4m3fn
    qkv_rows = (2 + 2 * 1) * 64
    tensors = {
        "transformer.vocab_embedding.weight": torch.zeros(64, 128, dtype=torch.bfloat16),
        "lm_head.weight": torch.zeros(64, 128, dtype=torch.bfloat16),
        "transformer.layers.0.attention.qkv.weight": torch.zeros(qkv_rows // pack, 128).to(dtype),
        "transformer.layers.0.attention.dense.weight": torch.zeros(128 // pack, 128).to(dtype),
        "transformer.layers.0.mlp.fc.weight": torch.zeros(256 // pack, 128).to(dtype),
        "transformer.layers.0.mlp.gate.weight": torch.zeros(256 // pack, 128).to(dtype),
        "transformer.layers.0.mlp.proj.weight": torch.zeros(128 // pack, 256).to(dtype),
    }
    if qkv_bias:
        tensors["transformer.layers.0.attention.qkv.bias"] = torch.zeros(qkv_rows, dtype=torch.bfloat16)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, tmp_path / "rank0.safetensors")
    return tmp_path


def test_missing_rope_fields_are_restored_from_the_source(tmp_path):
    checkpoint = _exported(tmp_path, int4=False)
    corrections = check_trtllm_checkpoint(checkpoint, SOURCE, tp_size=1)
    assert {c.field for c in corrections} == {"rotary_base", "rotary_scaling"}
    fixed = json.loads((checkpoint / "config.json").read_text())
    assert fixed["rotary_base"] == 500000.0
    assert fixed["rotary_scaling"]["type"] == "llama3" and fixed["rotary_scaling"]["factor"] == 8.0
    assert fixed["rotary_scaling"]["original_max_position_embeddings"] == 128
    assert check_trtllm_checkpoint(checkpoint, SOURCE, tp_size=1) == []  # now faithful


def test_wrong_head_size_is_corrected_when_packed_shapes_prove_it(tmp_path):
    """The INT4-AWQ export wrote head_size 32 for a head_dim-64 model: the packed qkv rows prove 64."""
    checkpoint = _exported(tmp_path, int4=True, head_size=32, rotary_base=500000.0)
    corrections = {c.field: c for c in check_trtllm_checkpoint(checkpoint, SOURCE, tp_size=1)}
    assert corrections["head_size"].exported == 32 and corrections["head_size"].corrected == 64
    assert "shapes" in corrections["head_size"].evidence
    assert json.loads((checkpoint / "config.json").read_text())["head_size"] == 64


def test_tensors_that_disagree_with_the_source_are_refused(tmp_path):
    checkpoint = _exported(tmp_path, int4=False)
    source = {**SOURCE, "vocab_size": 96}
    with pytest.raises(ExportCheckError, match=r"vocab_embedding.weight has shape \[64, 128\], the source model implies \[96, 128\]"):
        check_trtllm_checkpoint(checkpoint, source, tp_size=1)


def test_shared_embedding_for_an_untied_model_is_refused(tmp_path):
    checkpoint = _exported(tmp_path, int4=False, share_embedding_table=True)
    with pytest.raises(ExportCheckError, match="share_embedding_table is true"):
        check_trtllm_checkpoint(checkpoint, SOURCE, tp_size=1)


def test_tp_mismatch_is_refused(tmp_path):
    checkpoint = _exported(tmp_path, int4=False)
    with pytest.raises(ExportCheckError, match="mapping.tp_size is 1, the recipe asks for 2"):
        check_trtllm_checkpoint(checkpoint, SOURCE, tp_size=2)


def test_transformers4_rope_layout_is_read_too(tmp_path):
    checkpoint = _exported(tmp_path, int4=False)
    source = {k: v for k, v in SOURCE.items() if k != "rope_parameters"}
    source.update(rope_theta=10000.0, rope_scaling=None)
    corrections = check_trtllm_checkpoint(checkpoint, source, tp_size=1)
    assert [c.field for c in corrections] == ["rotary_base"]
    assert "rotary_scaling" not in json.loads((checkpoint / "config.json").read_text())


# Qwen2 as ModelOpt exports it without tensorrt_llm: the generic config, no qwen_type and no Qwen fields.
QWEN2 = {**{k: v for k, v in SOURCE.items() if k != "rope_parameters"}, "model_type": "qwen2",
         "architectures": ["Qwen2ForCausalLM"], "rope_theta": 1000000.0, "head_dim": 64}


def test_qwen2_export_without_qwen_type_is_corrected_with_proof(tmp_path):
    checkpoint = _exported(tmp_path, int4=False, qkv_bias=True, architecture="Qwen2ForCausalLM")
    config = json.loads((checkpoint / "config.json").read_text())
    del config["attn_bias"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    corrections = {c.field: c for c in check_trtllm_checkpoint(checkpoint, QWEN2, tp_size=1)}
    assert corrections["qwen_type"].exported is None and corrections["qwen_type"].corrected == "qwen2"
    assert "model_type" in corrections["qwen_type"].evidence
    assert "QWenConfig" in corrections["qwen_type"].evidence or "qwen-cfg" in corrections["qwen_type"].evidence
    # attn_bias is proven by the tensors too: qkv.bias is there in every layer.
    assert corrections["attn_bias"].corrected is True and "qkv.bias present" in corrections["attn_bias"].evidence
    assert corrections["rotary_base"].corrected == 1000000.0
    fixed = json.loads((checkpoint / "config.json").read_text())
    assert fixed["qwen_type"] == "qwen2" and fixed["moe"] == {"num_experts": 0, "top_k": 0, "normalization_mode": 0}
    assert fixed["seq_length"] == 8192 and fixed["use_logn_attn"] is False
    assert check_trtllm_checkpoint(checkpoint, QWEN2, tp_size=1) == []  # now faithful


def test_a_field_the_tensors_contradict_is_refused(tmp_path):
    """Qwen3 has no qkv bias by TensorRT-LLM's rule; a checkpoint carrying one cannot be proven and stops."""
    checkpoint = _exported(tmp_path, int4=False, qkv_bias=True, architecture="Qwen3ForCausalLM")
    source = {**QWEN2, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}
    with pytest.raises(ExportCheckError, match=r"attn_bias is False by TensorRT-LLM's rule .*qkv.bias is present"):
        check_trtllm_checkpoint(checkpoint, source, tp_size=1)
    assert "qwen_type" not in json.loads((checkpoint / "config.json").read_text())  # nothing written


def test_a_family_without_a_checkpoint_row_is_refused(tmp_path):
    checkpoint = _exported(tmp_path, int4=False)
    with pytest.raises(ExportCheckError, match="no TensorRT-LLM checkpoint for model_type 'gemma2'"):
        check_trtllm_checkpoint(checkpoint, {**SOURCE, "model_type": "gemma2"}, tp_size=1)


def test_a_wrong_architecture_is_refused(tmp_path):
    checkpoint = _exported(tmp_path, int4=False, architecture="MistralForCausalLM")
    with pytest.raises(ExportCheckError, match="architecture is 'MistralForCausalLM'"):
        check_trtllm_checkpoint(checkpoint, SOURCE, tp_size=1)
