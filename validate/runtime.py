"""The reference runtime: the exported HF checkpoint, run in the model's own
transformers architecture on the CPU.

It reads the very files that get published: weights are decoded from their
stored dtypes and scales, activations and K/V are rounded with the exported
scales. Nothing comes from ModelOpt's in-memory model, so an export bug shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from kiln.validate.codecs import KV_CODECS, WEIGHT_CODECS, DecodedLinear

_KV_ATTENTION = "kiln_kv_fake_quant"


class ReferenceLinear(nn.Module):
    """A linear layer with decoded weights and the exported input transform."""

    def __init__(self, decoded: DecodedLinear, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(decoded.weight, requires_grad=False)
        self.bias = nn.Parameter(bias.to(torch.float32), requires_grad=False) if bias is not None else None
        self.input_transform = decoded.input_transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        return nn.functional.linear(x, self.weight, self.bias)


def _kv_fake_quant_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    codec = getattr(module, "kiln_kv_codec", None)
    if codec is not None:
        key = codec(key, module.kiln_k_scale)
        value = codec(value, module.kiln_v_scale)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_KV_ATTENTION, _kv_fake_quant_attention)


def _load_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors in the exported checkpoint")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(load_file(path))
    return tensors


def read_quant_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "hf_quant_config.json"
    return json.loads(path.read_text())["quantization"] if path.exists() else {}


def load_reference_model(hf_dir: Path, trust_remote_code: bool = False) -> nn.Module:
    """Build the exported checkpoint's model with decoded weights, float32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dir = Path(hf_dir)
    quant = read_quant_config(hf_dir)
    algo, kv_algo = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    if algo is not None and algo not in WEIGHT_CODECS:
        raise NotImplementedError(f"{hf_dir}: quant_algo {algo} has no decoder in kiln's reference runtime")
    if kv_algo is not None and kv_algo not in KV_CODECS:
        raise NotImplementedError(f"{hf_dir}: kv_cache_quant_algo {kv_algo} has no decoder in kiln's reference runtime")

    config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are decoded here, not by a transformers quantizer
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    tensors = _load_tensors(hf_dir)
    consumed: set[str] = set()

    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or f"{name}.weight_scale" not in tensors:
            continue
        decoded = WEIGHT_CODECS[algo](name, tensors, quant.get("group_size"))
        bias = tensors.get(f"{name}.bias")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, ReferenceLinear(decoded, bias))
        consumed.update(k for k in tensors if k.startswith(f"{name}.") and not k.endswith(("k_scale", "v_scale")))

    if kv_algo is not None:
        _attach_kv_scales(model, tensors, KV_CODECS[kv_algo], consumed)
        _register_attention()
        model.set_attn_implementation(_KV_ATTENTION)

    plain = {k: v.to(torch.float32) for k, v in tensors.items() if k not in consumed}
    missing, unexpected = model.load_state_dict(plain, strict=False)
    missing = [k for k in missing if not _is_decoded_param(model, k)]
    if getattr(config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
        model.tie_weights()
    if missing or unexpected:
        raise ValueError(f"{hf_dir}: checkpoint does not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def _is_decoded_param(model: nn.Module, key: str) -> bool:
    owner, _, _ = key.rpartition(".")
    try:
        return isinstance(model.get_submodule(owner), ReferenceLinear)
    except AttributeError:
        return False


def _attach_kv_scales(model: nn.Module, tensors: dict, codec, consumed: set[str]) -> None:
    attached = 0
    for name, module in model.named_modules():
        k_key, v_key = f"{name}.k_proj.k_scale", f"{name}.v_proj.v_scale"
        if k_key in tensors and v_key in tensors:
            module.kiln_kv_codec = codec
            module.kiln_k_scale = tensors[k_key].to(torch.float32)
            module.kiln_v_scale = tensors[v_key].to(torch.float32)
            consumed.update((k_key, v_key))
            attached += 1
    if attached == 0:
        raise ValueError("the checkpoint declares a quantized KV cache but carries no k_scale / v_scale")


def load_baseline_model(model_dir: Path, trust_remote_code: bool = False, allow_pickle: bool = False) -> nn.Module:
    """The unquantized source model, float32, eval mode: what the variant is compared against."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,
    ).eval()
