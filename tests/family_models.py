"""One small model per family of the family table, each with the feature that family's TensorRT-LLM fields or
reference-runtime quirks are about. Test material: kiln's package keeps only the trainer
(tests.testmodel), which `make demo` uses for the demo model; these configs exist for the tests
(tests/test_families.py and the modules that take the `family_models` fixture) and tests/prepare.py."""

from __future__ import annotations

from pathlib import Path

from tests.testmodel import TestModelSpec, ensure_test_model

# The widths divide INT4-AWQ's group 64 and NVFP4's 16.
FAMILY_SPEC = TestModelSpec(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                            steps=120, spec_version=3)
FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {"head_dim": 64}),                           # head_dim != hidden / heads
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),              # qkv bias, tied embeddings
    "qwen3": ("Qwen3Config", {"head_dim": 32}),                           # q/k norms
    "mistral": ("MistralConfig", {"sliding_window": 64}),                 # sliding window under seq_len
    "gemma2": ("Gemma2Config", {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 64,
                                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    "phi3": ("Phi3Config", {}),                                           # fused qkv_proj and gate_up_proj
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),   # sparse MoE
}


def family_model(family: str) -> Path:
    """The family's trained model, trained once per machine (cached like the demo model)."""
    return ensure_test_model(spec=FAMILY_SPEC, family=(family, *FAMILY_CONFIGS[family]))
