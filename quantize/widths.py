"""Checks on a model's layers before anything is quantized: block sizes that must divide each layer's input
width, and exclude patterns that must name a module. Read from safetensors headers (or config.json alone
before the weights are fetched): no tensor is loaded."""

from __future__ import annotations

import json
import re
from fnmatch import fnmatchcase
from pathlib import Path

from kiln.quantize.formats import FORMATS, QuantFormat
from kiln.quantize.headers import safetensors_header


def _linear_input_widths(model_dir: Path) -> dict[str, int]:
    """Input width of every 2-D weight, read from safetensors headers (no tensor is loaded)."""
    widths = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        for name, info in safetensors_header(path).items():
            if not name.endswith(".weight") or len(info["shape"]) != 2:
                continue
            if "embed" in name or "lm_head" in name:  # ModelOpt leaves these unquantized
                continue
            widths[name[: -len(".weight")]] = info["shape"][1]
    return widths


def _config_input_widths(config: dict) -> dict[str, int]:
    """Input widths of a decoder's linear layers from config.json alone (before the weights are fetched)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    widths = {}
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj"):
            widths[f"{layer}.self_attn.{proj}"] = hidden
        widths[f"{layer}.self_attn.o_proj"] = heads * head_dim
        widths[f"{layer}.mlp.gate_proj"] = widths[f"{layer}.mlp.up_proj"] = hidden
        widths[f"{layer}.mlp.down_proj"] = inter
    return widths


def under(name: str, pattern: str) -> bool:
    """Whether module `name` is `pattern` or lies under a module it names (exclude and only apply as `pattern.*`)."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, f"{pattern}.*")


def layer_width_problems(model_dir: Path, quant: QuantFormat, group_size: int | None,
                         exclude: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> list[str]:
    """Layers whose input width the format's block size does not divide, grouped by name pattern.

    Reads safetensors headers when the weights are there, else config.json. Excluded layers, and with `only`
    the layers under none of its patterns, stay unquantized, so their widths do not matter.
    """
    spec = FORMATS[quant]
    block = group_size or spec.default_group_size
    if not block:
        return []
    model_dir = Path(model_dir)
    if any(model_dir.glob("*.safetensors")):
        widths = _linear_input_widths(model_dir)
    else:
        widths = _config_input_widths(json.loads((model_dir / "config.json").read_text()))
    bad: dict[str, int] = {}
    for name, width in widths.items():
        if any(fnmatchcase(name, pattern) for pattern in exclude):
            continue
        if only and not any(under(name, pattern) for pattern in only):
            continue
        if width % block:
            bad.setdefault(re.sub(r"\.\d+\.", ".*.", name), width)
    return [f"{pattern} (input width {width})" for pattern, width in sorted(bad.items())]


def unmatched_excludes(model_dir: Path, exclude: tuple[str, ...]) -> list[str]:
    """Exclude (or only) patterns that name no module of the model, nor a parent of one: a typo would otherwise
    quantize everything (or, for only, nothing).

    Module names come from the safetensors headers (a tensor's name less its last part); `lm_head`
    exists even when tied to the embeddings. Without weights on disk nothing can be said: [].
    """
    shards = sorted(Path(model_dir).glob("*.safetensors"))
    if not exclude or not shards:
        return []
    modules = {"lm_head"}
    for path in shards:
        modules |= {name.rsplit(".", 1)[0] for name in safetensors_header(path) if "." in name}
    return [p for p in exclude if not any(under(m, p) for m in modules)]
