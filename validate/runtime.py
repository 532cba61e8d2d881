"""The reference runtime: the exported HF checkpoint, run in the model's own
transformers architecture on the CPU.

It reads the very files that get published: weights are decoded from their
stored dtypes and scales, activations and K/V are rounded with the exported
scales. Nothing comes from ModelOpt's in-memory model, so an export bug shows.
Here: the modules it runs with; kiln.validate.reference_loader builds models
from the files with them (whole, or a decoder layer at a time).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from kiln.validate.checkpoint_tensors import replace_module
from kiln.validate.codecs import DecodedLinear, plain_linear
from kiln.validate.experts import ReferenceExperts, fused_as_reference, is_fused_experts

_KV_ATTENTION = "kiln_kv_fake_quant"


class ReferenceLinear(nn.Module):
    """A linear layer that keeps its weight as stored and computes in float32.

    The weight is decoded when the layer runs (a quantized code with its scales, or a
    bf16/fp16 tensor upcast exactly), so a model holds its stored bytes, not 4 per weight.
    The stored tensors are buffers, so moving the module to a GPU moves them.
    """

    def __init__(self, decoded: DecodedLinear, bias: torch.Tensor | None):
        super().__init__()
        self._decode, self._transform = decoded.decode, decoded.input_transform
        self._stored_names = tuple(decoded.stored)
        for key, tensor in decoded.stored.items():
            self.register_buffer(f"stored_{key}", tensor, persistent=False)
        self.in_features = decoded.in_features
        self.bias = nn.Parameter(bias.to(torch.float32), requires_grad=False) if bias is not None else None
        self._kept: torch.Tensor | None = None

    def _stored(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, f"stored_{key}") for key in self._stored_names}

    @property
    def weight(self) -> torch.Tensor:
        return self._decode(self._stored())

    def keep_decoded(self) -> None:
        """Decode the weight once and keep it (float32, 4 bytes per weight) for every later call: what makes
        many small forwards fast (lm-eval's requests one at a time, generation token by token). The result of
        each call is unchanged."""
        self._kept = self._decode(self._stored())

    @property
    def plain_rows(self) -> torch.Tensor | None:
        """The stored 16-bit weight [out, in] of an unquantized layer, whose rows decode on their own (an exact
        upcast); None for a quantized one, whose scales span rows, or one whose decoded weight is kept."""
        if self._stored_names != ("weight",) or self._transform is not None or self._kept is not None:
            return None
        weight = self.stored_weight
        return weight if weight.dtype in (torch.bfloat16, torch.float16) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stored = self._stored()
        if self._transform is not None:
            x = self._transform(x, stored)
        return nn.functional.linear(x, self._kept if self._kept is not None else self._decode(stored), self.bias)


def keep_decoded_weights(model: nn.Module, budget_bytes: int) -> bool:
    """Keep every reference layer's decoded float32 weight (ReferenceLinear.keep_decoded) when they fit in
    `budget_bytes` together; False (nothing kept, each call decodes) when they do not."""
    layers = [m for m in model.modules() if isinstance(m, ReferenceLinear)]
    needed = sum(4 * m.in_features * next(iter(m._stored().values())).shape[0] for m in layers)
    if needed > budget_bytes:
        return False
    for layer in layers:
        layer.keep_decoded()
    return True


class Float32Embedding(nn.Module):
    """An embedding table kept as stored (bf16/fp16) whose rows come out float32 (an exact upcast),
    times the model's embedding scale where it has one (Gemma: sqrt(hidden_size))."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None, scale: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.padding_idx = padding_idx
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids, self.weight).to(torch.float32)
        return rows if self.scale is None else rows * torch.tensor(self.scale, dtype=torch.float32)


def _is_plain_embedding(module: nn.Module) -> bool:
    """nn.Embedding itself, or a subclass that only scales its rows by `scalar_embed_scale` (Gemma's)."""
    return type(module) is nn.Embedding or (isinstance(module, nn.Embedding) and hasattr(module, "scalar_embed_scale"))


def _float32_embedding(module: nn.Embedding, weight: torch.Tensor) -> Float32Embedding:
    scale = getattr(module, "scalar_embed_scale", None)
    return Float32Embedding(weight, module.padding_idx, None if scale is None else float(scale))


def float32_math(model: nn.Module) -> nn.Module:
    """Keep a loaded model's large tensors in their stored 16-bit dtype but compute in float32.

    Linear and embedding weights stay as loaded and are upcast per use (bf16 -> fp32 is exact);
    the small tensors (norms, biases, buffers) become float32. The logits equal those of the same
    model loaded in float32, at half the memory.
    """
    _to_float32_math(model)
    return model


@contextlib.contextmanager
def float32_math_view(model: nn.Module) -> Iterator[nn.Module]:
    """`float32_math` for the duration of a `with`, then the model exactly as it was (the same module
    and tensor objects): the quantize stage's freshly loaded model gives the baseline's logits
    before ModelOpt touches it, so the weights are read from disk once for both."""
    undo = _to_float32_math(model)
    try:
        yield model
    finally:
        for restore in reversed(undo):
            restore()


def _to_float32_math(model: nn.Module) -> list:
    """Swap in the float32-math modules and tensors; returns how to put each original back."""
    undo = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            replacement = ReferenceLinear(plain_linear(module.weight.data), module.bias)
        elif _is_plain_embedding(module):
            replacement = _float32_embedding(module, module.weight.data)
        elif is_fused_experts(module):   # MoE: per-expert views of the 16-bit weights, not a float32 copy
            replacement = fused_as_reference(module, lambda w: ReferenceLinear(plain_linear(w), None))
        else:
            continue
        replace_module(model, name, replacement)
        undo.append(lambda name=name, module=module: replace_module(model, name, module))
    for module in model.modules():
        if isinstance(module, (ReferenceLinear, Float32Embedding, ReferenceExperts)):
            continue
        for table in (module._parameters, module._buffers):
            for key, tensor in list(table.items()):
                if tensor is None or not tensor.is_floating_point() or tensor.dtype == torch.float32:
                    continue
                upcast = tensor.data.to(torch.float32)
                table[key] = nn.Parameter(upcast, requires_grad=False) if table is module._parameters else upcast
                undo.append(lambda table=table, key=key, tensor=tensor: table.__setitem__(key, tensor))
    return undo


def _kv_fake_quant_attention(implementation: str):
    """Attention that rounds K and V with the exported scales, then runs the attention function the model
    would use itself: its modeling file's eager one (soft-capping families: SDPA has no soft-cap) or a
    registered one. Layers without scales pass through unrounded."""
    import sys

    from transformers import AttentionInterface

    def attention(module, query, key, value, attention_mask, **kwargs):
        codec = getattr(module, "kiln_kv_codec", None)
        if codec is not None:
            key = codec(key, module.kiln_k_scale)
            value = codec(value, module.kiln_v_scale)
        inner = (sys.modules[type(module).__module__].eager_attention_forward if implementation == "eager"
                 else AttentionInterface()[implementation])
        return inner(module, query, key, value, attention_mask, **kwargs)

    return attention


def _use_kv_fake_quant_attention(model: nn.Module) -> None:
    """Route the model's attention through the KV-cache rounding.

    The mask function is registered under the same name: transformers builds no mask at all for an attention
    name it has no mask function for, which would drop sliding windows (Mistral) and, under eager, causality.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    implementation = model.config._attn_implementation or "eager"
    name = f"{_KV_ATTENTION}_{implementation}"
    AttentionInterface.register(name, _kv_fake_quant_attention(implementation))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
    model.set_attn_implementation(name)


def place(model: nn.Module, placement) -> nn.Module:
    """Put a model built on the CPU where the placement says: unchanged on the CPU; on GPUs, spread by
    accelerate's device map under the placement's caps, with what does not fit offloaded to CPU memory.
    Inputs may stay on the CPU: accelerate's hooks move them, and the logits come back to the CPU."""
    if not placement.on_gpu:
        return model
    from accelerate import dispatch_model

    device_map = device_map_for(model, placement)
    if set(device_map.values()) == {0}:
        return model.to("cuda:0")
    return dispatch_model(model, device_map=device_map, offload_buffers=True)


def device_map_for(model: nn.Module, placement) -> dict:
    """accelerate's device map for a CPU-built model under the placement's caps (whole decoder layers per device)."""
    from accelerate import infer_auto_device_map

    return infer_auto_device_map(model, no_split_module_classes=list(model._no_split_modules or ()),
                                 **placement.dispatch_kwargs())
