"""The reference runtime: the exported HF checkpoint, run in the model's own
transformers architecture on the CPU.

It reads the very files that get published: weights are decoded from their
stored dtypes and scales, activations and K/V are rounded with the exported
scales. Nothing comes from ModelOpt's in-memory model, so an export bug shows.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from kiln.quantize import MIXED_PRECISION, family_of
from kiln.validate.checkpoint_tensors import CheckpointTensors, replace_module
from kiln.validate.codecs import KV_CODECS, WEIGHT_CODECS, DecodedLinear, plain_linear
from kiln.validate.compressed import linear_decoder, read_compressed_config
from kiln.validate.experts import ReferenceExperts, exported_block_names, fused_as_reference, is_fused_experts, replace_experts

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


def read_quant_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "hf_quant_config.json"
    return json.loads(path.read_text())["quantization"] if path.exists() else {}


def decoder_for(hf_dir: Path, quant: dict, compressed: dict | None, tensors: CheckpointTensors
                ) -> Callable[[str, nn.Module | None], DecodedLinear]:
    """How each linear layer's stored tensors decode: by compressed-tensors' config groups, by the codec of
    the exported quant_algo (a layer with scales; a MIXED_PRECISION checkpoint names each layer's in
    `quantized_layers`), or as its 16-bit weight as stored."""
    algo = quant.get("quant_algo")
    per_layer = quant.get("quantized_layers") or {} if algo == MIXED_PRECISION else None
    used = {cfg.get("quant_algo") for cfg in per_layer.values()} if per_layer is not None else {algo} - {None}
    unknown = sorted(str(a) for a in used if a not in WEIGHT_CODECS)
    if unknown:
        raise NotImplementedError(f"{hf_dir}: quant_algo {', '.join(unknown)} has no decoder in kiln's reference runtime")
    compressed_linear = linear_decoder(compressed, tensors.tensors) if compressed else None

    def layer_codec(name: str) -> tuple[str, int | None]:
        if per_layer is None:
            return algo, quant.get("group_size")
        if name not in per_layer:
            raise ValueError(f"{hf_dir}: {name} stores scales but hf_quant_config.json's quantized_layers has no "
                             "entry for it, so its format is unknown")
        return per_layer[name]["quant_algo"], per_layer[name].get("group_size")

    def decode(name: str, module: nn.Module | None = None) -> DecodedLinear:
        decoded = compressed_linear(name, module) if compressed_linear and module is not None else None
        if decoded is None and f"{name}.weight_scale" in tensors:
            layer_algo, group_size = layer_codec(name)
            decoded = WEIGHT_CODECS[layer_algo](name, tensors.tensors, group_size)
        return decoded if decoded is not None else plain_linear(tensors[f"{name}.weight"])

    return decode


def load_reference_model(hf_dir: Path, trust_remote_code: bool = False) -> nn.Module:
    """Build the exported checkpoint's model: weights as stored, decoded per layer, float32 math, eval mode.

    The architecture is built on the meta device (no memory, no random init); every weight then
    comes from the checkpoint, and nothing is left on meta but what transformers initialises
    itself from the config (RoPE frequencies).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dir = Path(hf_dir)
    quant = read_quant_config(hf_dir)
    kv_algo = quant.get("kv_cache_quant_algo")
    if kv_algo is not None and kv_algo not in KV_CODECS:
        raise NotImplementedError(f"{hf_dir}: kv_cache_quant_algo {kv_algo} has no decoder in kiln's reference runtime")
    config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are decoded here, not by a transformers quantizer
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    tensors = CheckpointTensors.read(hf_dir)
    compressed = read_compressed_config(hf_dir)
    decode = decoder_for(hf_dir, quant, compressed, tensors)

    def reference_linear(name: str, module: nn.Module | None = None) -> ReferenceLinear:
        return ReferenceLinear(decode(name, module), tensors.get(f"{name}.bias"))

    family = family_of(config.to_dict())
    if family is not None and family.experts is not None:
        if compressed:
            raise NotImplementedError(f"{hf_dir}: kiln's reference runtime does not decode compressed-tensors "
                                      "experts of a mixture-of-experts model yet")
        replace_experts(model, tensors, family.experts, reference_linear)
        tensors.rename(exported_block_names(tensors, family.experts))
    _replace_stored_layers(model, tensors, reference_linear)
    if getattr(config, "tie_word_embeddings", False):
        _tie_output_embeddings(model)
    if kv_algo is not None:
        _attach_kv_scales(model, tensors, KV_CODECS[kv_algo])
        _use_kv_fake_quant_attention(model)
    _load_plain_parameters(model, tensors, hf_dir)
    _materialise_derived_buffers(model)
    return model.eval()


def _replace_stored_layers(model: nn.Module, tensors: CheckpointTensors, reference_linear) -> None:
    """Each linear layer and embedding the checkpoint stores, as kiln's reference module over its stored bytes."""
    for name, module in list(model.named_modules()):
        stored_weight = f"{name}.weight" in tensors or f"{name}.weight_packed" in tensors  # packed: compressed-tensors
        if isinstance(module, nn.Linear) and stored_weight:
            replace_module(model, name, reference_linear(name, module))
            tensors.take_layer(name, keep=("k_scale", "v_scale"))
        elif _is_plain_embedding(module) and f"{name}.weight" in tensors:
            replace_module(model, name, _float32_embedding(module, tensors[f"{name}.weight"]))
            tensors.take(f"{name}.weight")


def _load_plain_parameters(model: nn.Module, tensors: CheckpointTensors, hf_dir: Path) -> None:
    """What no decoded layer took (norms, biases of other modules) loads as float32 parameters; the checkpoint
    must then match the architecture exactly."""
    plain = {k: v.to(torch.float32) for k, v in tensors.untaken().items()}
    missing, unexpected = model.load_state_dict(plain, strict=False, assign=True)
    missing = [k for k in missing if not _is_decoded_param(model, k)]
    if missing or unexpected:
        raise ValueError(f"{hf_dir}: checkpoint does not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")


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


def _tie_output_embeddings(model: nn.Module) -> None:
    """Tied embeddings: the output projection reads the input embedding table (exported once)."""
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if isinstance(embedding, Float32Embedding) and not isinstance(output, ReferenceLinear):
        name = next(n for n, m in model.named_modules() if m is output)
        replace_module(model, name, ReferenceLinear(plain_linear(embedding.weight.data), None))


def _materialise_derived_buffers(model: nn.Module) -> None:
    """Buffers no checkpoint holds (RoPE frequencies) are computed from the config, as transformers does."""
    for name, module in model.named_modules():
        on_meta = [k for k, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not on_meta:
            continue
        loaded = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
        for key in on_meta:
            module._buffers[key] = torch.empty_like(module._buffers[key], device="cpu")
        model._init_weights(module)
        for key, tensor in loaded.items():   # what came from the checkpoint stays as it came
            if not tensor.is_meta:
                getattr(module, "_parameters" if key in module._parameters else "_buffers")[key] = tensor
        if any(module._buffers[k].is_meta for k in on_meta):
            raise ValueError(f"{name}: buffers {on_meta} could not be computed from the config")
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise ValueError(f"the checkpoint has no values for {leftover[:5]}")


def _is_decoded_param(model: nn.Module, key: str) -> bool:
    """Whether `key` belongs to a layer already filled from the checkpoint (decoded or kept as stored)."""
    owner, _, _ = key.rpartition(".")
    try:
        return isinstance(model.get_submodule(owner), (ReferenceLinear, Float32Embedding))
    except AttributeError:
        return False


def _attach_kv_scales(model: nn.Module, tensors: CheckpointTensors, codec) -> None:
    attached = 0
    for name, module in model.named_modules():
        k_key, v_key = f"{name}.k_proj.k_scale", f"{name}.v_proj.v_scale"
        if k_key in tensors and v_key in tensors:
            module.kiln_kv_codec = codec
            # Buffers, so that placing the model on a GPU moves them with the attention module.
            module.register_buffer("kiln_k_scale", tensors[k_key].to(torch.float32), persistent=False)
            module.register_buffer("kiln_v_scale", tensors[v_key].to(torch.float32), persistent=False)
            tensors.take(k_key, v_key)
            attached += 1
    if attached == 0:
        raise ValueError("the checkpoint declares a quantized KV cache but carries no k_scale / v_scale")


def load_baseline_model(model_dir: Path, trust_remote_code: bool = False, allow_pickle: bool = False) -> nn.Module:
    """The unquantized source model, its weights exactly as stored, computing in float32, eval mode:
    what the variant is compared against."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype="auto", trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,
    )
    return float32_math(model).eval()
