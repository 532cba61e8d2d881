"""What a day-0 build writes, fixed before a weight is read: each output tensor's name, dtype, shape and place.

The model is never built. Its class is instantiated on the meta device (no memory) for three facts transformers and
ModelOpt would derive from it: the state dict's order and dtypes (what `save_pretrained` shards), which linears the
recipe's ModelOpt config quantizes, and ModelOpt's hf_quant_config.json (`get_quant_config` reads the quantizers'
settings, not their values). The exported dtype and shape of a quantized linear depend on its weight's shape alone,
so each distinct shape is quantized once, from random values, by the very function the workers run. The shards are
then cut as transformers cuts them (huggingface_hub's `split_torch_state_dict_into_shards` in state-dict order).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from kiln.quantize.safetensors_layout import ShardLayout, StoredTensor, safetensors_dtype, stored_tensors

# Sibling linears that read the same input in kiln's dense families (checked against ModelOpt's own detection, which
# runs the model, in tests/test_day0.py): ModelOpt's export unifies their scales where the format has a shared one.
SHARED_INPUT = (frozenset({"q_proj", "k_proj", "v_proj"}), frozenset({"gate_proj", "up_proj"}))
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


class DayZeroError(ValueError):
    """The day-0 path cannot make this checkpoint (the message says why and names `quantize.path: modelopt`)."""


@dataclass(frozen=True)
class Unit:
    """One piece of work: the linears quantized together (those reading one input), or one tensor copied."""

    modules: tuple[str, ...]            # quantized linears ((): a copy of `tensors`)
    tensors: tuple[str, ...]            # the source tensors read
    outputs: tuple[str, ...]            # the exported tensors written


@dataclass
class Day0Plan:
    sources: dict[str, StoredTensor]    # source tensor -> where it is stored
    units: list[Unit]
    shards: list[ShardLayout]
    index: dict | None                  # model.safetensors.index.json (None: one file)
    quant_config: dict                  # hf_quant_config.json
    skeleton: object                    # the meta-device model (its config and generation config are written)
    dtypes: dict[str, str] = field(default_factory=dict)   # copied tensor -> the torch dtype it is written in

    @property
    def digest(self) -> str:
        """What the plan writes, as one digest: a resumed build trusts shards only from the same plan."""
        return hashlib.sha256(b"".join(s.file.encode() + s.header for s in self.shards)).hexdigest()

    def shard_of(self) -> dict[str, ShardLayout]:
        return {name: shard for shard in self.shards for name in shard.slots}


def source_tensors(model_dir: Path) -> dict[str, StoredTensor]:
    """Every tensor of the source's safetensors, from the headers alone."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise DayZeroError(f"{model_dir}: no *.safetensors files; the day-0 path reads safetensors shards "
                           "(fix: quantize.path: modelopt)")
    sources = {}
    for file in files:
        sources.update(stored_tensors(file))
    return sources


def skeleton_model(model_dir: Path, dtype, trust_remote_code: bool):
    """The model's class on the meta device, with the generation config from_pretrained would give it (its file, or
    one made from config.json the way from_pretrained makes it: from_config's differs)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    if model.can_generate():
        try:
            model.generation_config = GenerationConfig.from_pretrained(model_dir)
        except OSError:
            model.generation_config = GenerationConfig.from_pretrained(model_dir, config_file_name="config.json",
                                                                       _from_model_config=True)
    return model.eval()


def shared_input_groups(linears: list[str]) -> list[tuple[str, ...]]:
    """The quantized linears, grouped by the input they read (siblings in SHARED_INPUT), in model order."""
    groups: dict[tuple, list[str]] = {}
    for name in linears:
        parent, _, leaf = name.rpartition(".")
        family = next((i for i, members in enumerate(SHARED_INPUT) if leaf in members), None)
        groups.setdefault((parent, family) if family is not None else (name,), []).append(name)
    return [tuple(group) for group in groups.values()]


def plan(model_dir: Path, config: dict, dtype, trust_remote_code: bool, max_shard_size: str,
         quantize_group) -> Day0Plan:
    """The plan for `config` (ModelOpt's quantization config) on the source in `model_dir`; `quantize_group(config,
    {name: weight}, {name: bias}, dtype)` is the workers' function, run here once per distinct linear shape."""
    import torch
    import modelopt.torch.quantization as mtq
    from huggingface_hub import split_torch_state_dict_into_shards
    from modelopt.torch.export.quant_utils import get_quant_config
    from modelopt.torch.export.model_config import QUANTIZATION_NONE
    from modelopt.torch.export.quant_utils import get_quantization_format
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    sources = source_tensors(model_dir)
    skeleton = skeleton_model(model_dir, dtype, trust_remote_code)
    plain = remove_tied_weights_from_state_dict(skeleton.state_dict(), skeleton)
    mtq.quantize(skeleton, {**config, "algorithm": None}, forward_loop=None)   # the quantizers' settings, no values
    quant_config = get_quant_config(skeleton)
    linears = [name for name, module in skeleton.named_modules()
               if hasattr(module, "weight_quantizer") and get_quantization_format(module) != QUANTIZATION_NONE]
    missing = [name for name in plain if name not in sources]
    if missing:
        raise DayZeroError(f"{model_dir}: the model's tensor {missing[0]} is not in its safetensors files ("
                           f"{len(missing)} missing; transformers renames this model's weights as it loads them), "
                           "so the day-0 path cannot read it (fix: quantize.path: modelopt)")

    outputs = _exported_tensors(plain, linears, config, dtype, quantize_group)
    by_module: dict[str, list[str]] = {name: [] for name in linears}
    for key in outputs:   # one pass, not one per linear: thousands of linears on a large model
        by_module.setdefault(key.rpartition(".")[0], []).append(key)
    quantized_keys = {f"{name}.{leaf}" for name in linears for leaf in ("weight", "bias")}
    units, order, dtypes = [], {}, {}
    for group in shared_input_groups(linears):
        read = tuple(k for name in group for k in (f"{name}.weight", f"{name}.bias") if k in plain)
        units.append(Unit(group, read, tuple(k for name in group for k in by_module[name])))
    for key, tensor in plain.items():
        if key in quantized_keys:
            module = key.rpartition(".")[0]
            order.update({k: outputs[k] for k in by_module[module]})
        else:
            order[key] = (tensor.dtype, tuple(tensor.shape))
            dtypes[key] = str(tensor.dtype).removeprefix("torch.")
            units.append(Unit((), (key,), (key,)))
    metas = {k: torch.empty(shape, dtype=dt, device="meta") for k, (dt, shape) in order.items()}
    split = split_torch_state_dict_into_shards(metas, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    shards = [ShardLayout.of(file, [(k, safetensors_dtype(order[k][0]), order[k][1],
                                     metas[k].numel() * metas[k].element_size()) for k in names], {"format": "pt"})
              for file, names in split.filename_to_tensors.items()]
    index = None
    if split.is_sharded:   # transformers' index: the exported model's parameter count (quantized weights as packed)
        parameters = sum(metas[k].numel() for k in order if k.endswith((".weight", ".bias")))
        index = {"metadata": {"total_parameters": parameters, **split.metadata},
                 "weight_map": split.tensor_to_filename}
    return Day0Plan({k: sources[k] for u in units for k in u.tensors}, units, shards, index, quant_config, skeleton,
                    dtypes)


def _exported_tensors(plain: dict, linears: list[str], config: dict, dtype, quantize_group) -> dict:
    """Every quantized linear's exported tensors ({name: (dtype, shape)}), from one quantization per distinct shape."""
    import torch

    probes: dict[tuple, dict] = {}
    exported = {}
    for name in linears:
        weight = plain[f"{name}.weight"]
        bias = plain.get(f"{name}.bias")
        shape_key = (tuple(weight.shape), bias is not None)
        if shape_key not in probes:
            generator = torch.Generator().manual_seed(0)
            values = {name: torch.randn(weight.shape, generator=generator).to(dtype)}
            biases = {name: torch.zeros(bias.shape, dtype=dtype)} if bias is not None else {}
            result = quantize_group(config, values, biases, dtype)
            probes[shape_key] = {k.removeprefix(name): (t.dtype, tuple(t.shape)) for k, t in result.items()}
        exported.update({name + suffix: facts for suffix, facts in probes[shape_key].items()})
    return exported


def write_index(plan_: Day0Plan, folder: Path) -> None:
    if plan_.index is not None:
        (Path(folder) / SAFE_INDEX).write_text(json.dumps(plan_.index, indent=2, sort_keys=True) + "\n")
