"""Building models from the files on disk: the exported checkpoint as the reference runtime runs it, and the
unquantized source as the baseline.

Either whole (every weight resident), or streamed: everything but the decoder layers resident, each decoder
layer built from its own tensors when validation reaches it (kiln.validate.layerwise), so a model larger
than memory is measured one layer at a time. Both ways share the same per-module steps, given the module
tree they fill and the name it has in the whole model.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from kiln.quantize import MIXED_PRECISION, family_of
from kiln.validate.checkpoint_tensors import CheckpointTensors, replace_module
from kiln.validate.codecs import KV_CODECS, WEIGHT_CODECS, DecodedLinear, plain_linear
from kiln.validate.compressed import linear_decoder, read_compressed_config
from kiln.validate.experts import exported_block_names, fused_source_experts, replace_experts
from kiln.validate.runtime import (
    Float32Embedding, ReferenceLinear, _float32_embedding, _is_plain_embedding, _use_kv_fake_quant_attention,
    float32_math,
)


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


@dataclass
class StreamedModel:
    """A model whose decoder layers stay on the meta device until `load_layer(i)` builds layer i from disk."""

    model: nn.Module
    layers: nn.ModuleList
    prefix: str                                  # the layers' name in the model: "model.layers"
    load_layer: Callable[[int], nn.Module]


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers of a causal LM and their name ("model.layers"), or ValueError naming the architecture."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder-layer list (model.layers) to validate one layer at a time")
    return next(n for n, m in model.named_modules() if m is layers), layers


def load_reference_model(hf_dir: Path, trust_remote_code: bool = False) -> nn.Module:
    """Build the exported checkpoint's model: weights as stored, decoded per layer, float32 math, eval mode.

    The architecture is built on the meta device (no memory, no random init); every weight then
    comes from the checkpoint, and nothing is left on meta but what transformers initialises
    itself from the config (RoPE frequencies).
    """
    return _ReferenceBuilder(Path(hf_dir), trust_remote_code).whole()


def stream_reference_model(hf_dir: Path, trust_remote_code: bool = False) -> StreamedModel:
    """The exported checkpoint's model with its decoder layers read from disk one at a time."""
    return _ReferenceBuilder(Path(hf_dir), trust_remote_code).streamed()


class _ReferenceBuilder:
    def __init__(self, hf_dir: Path, trust_remote_code: bool):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.hf_dir = hf_dir
        self.quant = read_quant_config(hf_dir)
        kv_algo = self.quant.get("kv_cache_quant_algo")
        if kv_algo is not None and kv_algo not in KV_CODECS:
            raise NotImplementedError(f"{hf_dir}: kv_cache_quant_algo {kv_algo} has no decoder in kiln's reference runtime")
        self.kv_codec = KV_CODECS[kv_algo] if kv_algo is not None else None
        config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are decoded here, not by a transformers quantizer
        self.config = config
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
        self.compressed = read_compressed_config(hf_dir)
        self.family = family_of(config.to_dict())

    def _fill(self, root: nn.Module, prefix: str, tensors: CheckpointTensors, streamed: str = "") -> int:
        """Every module of `root` (named `prefix` in the model) from `tensors`; returns the KV scales attached."""
        decode = decoder_for(self.hf_dir, self.quant, self.compressed, tensors)

        def reference_linear(name: str, module: nn.Module | None = None) -> ReferenceLinear:
            return ReferenceLinear(decode(name, module), tensors.get(f"{name}.bias"))

        if self.family is not None and self.family.experts is not None:
            if self.compressed:
                raise NotImplementedError(f"{self.hf_dir}: kiln's reference runtime does not decode compressed-tensors "
                                          "experts of a mixture-of-experts model yet")
            replace_experts(root, tensors, self.family.experts, reference_linear, prefix, streamed)
            tensors.rename(exported_block_names(tensors, self.family.experts))
        _replace_stored_layers(root, tensors, reference_linear, prefix)
        if root is self.model and getattr(self.config, "tie_word_embeddings", False):
            _tie_output_embeddings(self.model)
        attached = _attach_kv_scales(root, tensors, self.kv_codec, prefix) if self.kv_codec else 0
        _load_plain_parameters(root, tensors, self.hf_dir, prefix, streamed)
        _materialise_derived_buffers(root, self.model._init_weights, streamed)
        return attached

    def _finish(self) -> nn.Module:
        if self.kv_codec is not None:
            _use_kv_fake_quant_attention(self.model)
        return self.model.eval()

    def whole(self) -> nn.Module:
        if self._fill(self.model, "", CheckpointTensors.read(self.hf_dir)) == 0 and self.kv_codec is not None:
            raise ValueError("the checkpoint declares a quantized KV cache but carries no k_scale / v_scale")
        return self._finish()

    def streamed(self) -> StreamedModel:
        prefix, layers = decoder_layers(self.model)
        templates = list(layers)   # on meta: copied for each layer built
        inside = f"{prefix}."
        self._fill(self.model, "", CheckpointTensors.read(self.hf_dir, lambda k: not k.startswith(inside)), prefix)
        model = self._finish()

        def load_layer(index: int) -> nn.Module:
            name = f"{prefix}.{index}"
            layer = _fresh_copy(templates[index])
            tensors = CheckpointTensors.read(self.hf_dir, lambda k: k.startswith(f"{name}."))
            if self._fill(layer, name, tensors) == 0 and self.kv_codec is not None:
                raise ValueError(f"{self.hf_dir}: the checkpoint declares a quantized KV cache but {name} carries "
                                 "no k_scale / v_scale")
            return layer.eval()

        return StreamedModel(model, layers, prefix, load_layer)


def stream_baseline_model(model_dir: Path, trust_remote_code: bool = False) -> StreamedModel:
    """The unquantized source, as `load_baseline_model` runs it, with its decoder layers read from its safetensors
    one at a time (the names in the files must be the architecture's: a checkpoint transformers converts on
    load is refused, naming the tensors it lacks)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    family = family_of(config.to_dict())
    experts = family.experts if family is not None else None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=config.dtype, trust_remote_code=trust_remote_code)
    prefix, layers = decoder_layers(model)
    templates = [_fresh_copy(layer) for layer in layers]
    inside = f"{prefix}."
    tensors = CheckpointTensors.read(model_dir, lambda k: not k.startswith(inside))
    _load_exactly(model, tensors.tensors, model_dir, streamed=prefix)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _materialise_derived_buffers(model, model._init_weights, prefix)
    init = model._init_weights
    float32_math(model)

    def load_layer(index: int) -> nn.Module:
        name = f"{prefix}.{index}."
        layer = _fresh_copy(templates[index])
        stored = {k[len(name):]: v for k, v in CheckpointTensors.read(model_dir, lambda k: k.startswith(name)).tensors.items()}
        _load_exactly(layer, fused_source_experts(stored, experts) if experts else stored, model_dir)
        _materialise_derived_buffers(layer, init)
        return float32_math(layer).eval()

    return StreamedModel(model.eval(), layers, prefix, load_layer)


def _fresh_copy(template: nn.Module) -> nn.Module:
    """A copy of a (meta) decoder layer that shares the model's config objects: the attention implementation
    kiln sets on the model (the KV-cache rounding) must reach the layers built later."""
    memo = {id(m.config): m.config for m in template.modules() if hasattr(m, "config")}
    return copy.deepcopy(template, memo)


def _load_exactly(root: nn.Module, tensors: dict, model_dir: Path, streamed: str = "") -> None:
    missing, unexpected = root.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if not (streamed and k.startswith(f"{streamed}."))
               and not _tied_away(root, k)]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: its safetensors names are not the architecture's (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}), so it cannot be read one layer at a time "
                         "(fix: calibration.offload: none)")


def _tied_away(model: nn.Module, key: str) -> bool:
    """The output projection of a model with tied embeddings: not stored, it reads the input embedding."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (output is not None and getattr(model.config, "tie_word_embeddings", False)
            and any(m is output and key == f"{n}.weight" for n, m in model.named_modules()))


def _joined(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _replace_stored_layers(root: nn.Module, tensors: CheckpointTensors, reference_linear, prefix: str = "") -> None:
    """Each linear layer and embedding the checkpoint stores, as kiln's reference module over its stored bytes."""
    for local, module in list(root.named_modules()):
        name = _joined(prefix, local)
        stored_weight = f"{name}.weight" in tensors or f"{name}.weight_packed" in tensors  # packed: compressed-tensors
        if isinstance(module, nn.Linear) and stored_weight:
            replace_module(root, local, reference_linear(name, module))
            tensors.take_layer(name, keep=("k_scale", "v_scale"))
        elif _is_plain_embedding(module) and f"{name}.weight" in tensors:
            replace_module(root, local, _float32_embedding(module, tensors[f"{name}.weight"]))
            tensors.take(f"{name}.weight")


def _load_plain_parameters(root: nn.Module, tensors: CheckpointTensors, hf_dir: Path, prefix: str = "",
                           streamed: str = "") -> None:
    """What no decoded layer took (norms, biases of other modules) loads as float32 parameters; the checkpoint
    must then match the architecture exactly (but for the layers `streamed` builds later)."""
    cut = len(prefix) + 1 if prefix else 0
    plain = {k[cut:]: v.to(torch.float32) for k, v in tensors.untaken().items()}
    missing, unexpected = root.load_state_dict(plain, strict=False, assign=True)
    missing = [k for k in missing if not _is_decoded_param(root, k) and not (streamed and k.startswith(f"{streamed}."))]
    if missing or unexpected:
        raise ValueError(f"{hf_dir}: checkpoint does not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _tie_output_embeddings(model: nn.Module) -> None:
    """Tied embeddings: the output projection reads the input embedding table (exported once)."""
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if isinstance(embedding, Float32Embedding) and not isinstance(output, ReferenceLinear):
        name = next(n for n, m in model.named_modules() if m is output)
        replace_module(model, name, ReferenceLinear(plain_linear(embedding.weight.data), None))


def _materialise_derived_buffers(root: nn.Module, init_weights, streamed: str = "") -> None:
    """Buffers no checkpoint holds (RoPE frequencies) are computed from the config, as transformers does
    (`init_weights`: the whole model's _init_weights); the layers `streamed` builds later stay on meta."""
    def later(name: str) -> bool:
        return bool(streamed) and (name == streamed or name.startswith(f"{streamed}."))

    for name, module in root.named_modules():
        on_meta = [k for k, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not on_meta or later(name):
            continue
        # What came from the checkpoint stays as it came: init_weights writes in place (a Gemma 2 embedding's
        # meta `embed_scale` would re-initialise its table), so it gets stand-ins to write into instead.
        loaded = [(table, key, tensor) for table in (module._parameters, module._buffers)
                  for key, tensor in table.items() if tensor is not None and not tensor.is_meta]
        for table, key, tensor in loaded:
            table[key] = type(tensor)(torch.empty_like(tensor)) if isinstance(tensor, nn.Parameter) else torch.empty_like(tensor)
        for key in on_meta:
            module._buffers[key] = torch.empty_like(module._buffers[key], device="cpu")
        init_weights(module)
        for table, key, tensor in loaded:
            table[key] = tensor
        if any(module._buffers[k].is_meta for k in on_meta):
            raise ValueError(f"{name}: buffers {on_meta} could not be computed from the config")
    leftover = [n for n, p in root.named_parameters() if p.is_meta and not later(n)]
    if leftover:
        raise ValueError(f"the checkpoint has no values for {leftover[:5]}")


def _is_decoded_param(model: nn.Module, key: str) -> bool:
    """Whether `key` belongs to a layer already filled from the checkpoint (decoded or kept as stored)."""
    owner, _, _ = key.rpartition(".")
    try:
        return isinstance(model.get_submodule(owner), (ReferenceLinear, Float32Embedding))
    except AttributeError:
        return False


def _attach_kv_scales(root: nn.Module, tensors: CheckpointTensors, codec, prefix: str = "") -> int:
    """The exported K/V scales on each attention module that has them; returns how many."""
    attached = 0
    for local, module in root.named_modules():
        name = _joined(prefix, local)
        k_key, v_key = f"{name}.k_proj.k_scale", f"{name}.v_proj.v_scale"
        if k_key in tensors and v_key in tensors:
            module.kiln_kv_codec = codec
            # Buffers, so that placing the model on a GPU moves them with the attention module.
            module.register_buffer("kiln_k_scale", tensors[k_key].to(torch.float32), persistent=False)
            module.register_buffer("kiln_v_scale", tensors[v_key].to(torch.float32), persistent=False)
            tensors.take(k_key, v_key)
            attached += 1
    return attached


def load_baseline_model(model_dir: Path, trust_remote_code: bool = False, allow_pickle: bool = False) -> nn.Module:
    """The unquantized source model, its weights exactly as stored, computing in float32, eval mode:
    what the variant is compared against."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype="auto", trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,
    )
    return float32_math(model).eval()
