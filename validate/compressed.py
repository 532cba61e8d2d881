"""compressed-tensors checkpoints (llm-compressor's exports), decoded by compressed-tensors itself.

The checkpoint's config.json carries a `quantization_config` with `quant_method: compressed-tensors`:
config groups, each a quantization scheme, its on-disk format and the modules it targets. The
reference runtime matches each linear layer to its group with compressed-tensors' own matcher,
decompresses the stored tensors with the compressor registered for the group's format when the
layer runs, and quantizes the layer's input with compressed-tensors' fake quantization where the
scheme quantizes activations. kiln writes no decoder of its own for these formats.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from kiln.validate.codecs import DecodedLinear, Stored

QUANT_METHOD = "compressed-tensors"


def read_compressed_config(hf_dir: Path) -> dict | None:
    """The checkpoint's compressed-tensors quantization_config, or None for any other checkpoint."""
    path = Path(hf_dir) / "config.json"
    config = json.loads(path.read_text()).get("quantization_config") if path.exists() else None
    return config if config and config.get("quant_method") == QUANT_METHOD else None


def _activation_transform(args) -> Callable[[torch.Tensor, Stored], torch.Tensor] | None:
    """Input quantization as compressed-tensors' forward pass does it (dynamic scales only: llm-compressor's
    W8A8 computes them per token at run time; a static scheme would carry `input_scale`)."""
    if args is None:
        return None
    from compressed_tensors.quantization.lifecycle.forward import compute_dynamic_scales_and_zp, fake_quantize

    if not args.dynamic:
        def static(x, stored):
            return fake_quantize(x, stored["input_scale"], stored.get("input_zero_point"), args)
        return static

    def dynamic(x, stored):
        scale, zero_point = compute_dynamic_scales_and_zp(value=x, args=args, module=None)
        return fake_quantize(x=x, scale=scale, zero_point=zero_point, args=args)
    return dynamic


def linear_decoder(quantization_config: dict, tensors: dict[str, torch.Tensor]
                   ) -> Callable[[str, nn.Module], DecodedLinear | None]:
    """`decoder(name, module)`: the layer's stored tensors and their decompression, or None for a layer no
    config group targets (stored unquantized)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils import is_match

    config = QuantizationConfig.model_validate(quantization_config)
    groups = [(scheme, BaseCompressor.get_value_from_registry(scheme.format or config.format))
              for scheme in config.config_groups.values()]

    def decoder(name: str, module: nn.Module) -> DecodedLinear | None:
        for scheme, compressor in groups:
            if not is_match(name, module, scheme.targets, config.ignore or ()):
                continue
            prefix = f"{name}."
            stored = {key[len(prefix):]: tensor for key, tensor in tensors.items()
                      if key.startswith(prefix) and key[len(prefix):] != "bias"}

            def decode(s: Stored, scheme=scheme, compressor=compressor) -> torch.Tensor:
                return compressor.decompress(dict(s), scheme)["weight"].to(torch.float32)

            return DecodedLinear(stored, decode, _activation_transform(scheme.input_activations), module.in_features)
        return None

    return decoder
