"""Sparse-MoE blocks in the reference runtime.

transformers 5 keeps a block's experts fused (3-D `gate_up_proj` / `down_proj` parameters), while
ModelOpt's HF export writes them one tensor set per expert, in the transformers 4 layout that
TensorRT-LLM's PyTorch backend reads (`block_sparse_moe.experts.3.w1.weight`, ...). The family
table says which names a family uses; each expert becomes three ReferenceLinear layers decoded
from their stored format, run by the same routing as the fused module.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.validate.checkpoint_tensors import CheckpointTensors, replace_module


class ReferenceExperts(nn.Module):
    """Drop-in for a transformers 5 experts module: forward(hidden, top_k_index, top_k_weights)."""

    def __init__(self, experts: list[tuple[nn.Module, nn.Module, nn.Module]], act_fn):
        super().__init__()
        self.num_experts = len(experts)
        self.gate = nn.ModuleList(gate for gate, _, _ in experts)
        self.up = nn.ModuleList(up for _, up, _ in experts)
        self.down = nn.ModuleList(down for _, _, down in experts)
        self.act_fn = act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == expert)
            x = hidden_states[token]
            y = self.down[expert](self.act_fn(self.gate[expert](x)) * self.up[expert](x))
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def is_fused_experts(module: nn.Module) -> bool:
    """transformers 5's fused experts (Mixtral, Qwen3-MoE): 3-D gate_up_proj and down_proj, no biases."""
    weight = getattr(module, "gate_up_proj", None)
    return (isinstance(weight, nn.Parameter) and weight.dim() == 3 and hasattr(module, "down_proj")
            and getattr(module, "gate_up_proj_bias", None) is None)


def fused_as_reference(module: nn.Module, make_linear) -> ReferenceExperts:
    """The same experts as per-expert layers over views of the fused weights (gate rows first, then up),
    so that float32 math upcasts one expert at a time instead of copying every expert to float32."""
    width = module.gate_up_proj.shape[1] // 2
    fused, down = module.gate_up_proj.data, module.down_proj.data
    experts = [(make_linear(fused[e, :width]), make_linear(fused[e, width:]), make_linear(down[e]))
               for e in range(module.num_experts)]
    return ReferenceExperts(experts, module.act_fn)


def exported_block_names(tensors: CheckpointTensors, layout) -> dict[str, str]:
    """Renames from the export's MoE block prefix to the architecture's (`block_sparse_moe.` -> `mlp.`)."""
    if layout.block == "mlp":
        return {}
    old, new = f".{layout.block}.", ".mlp."
    return {key: key.replace(old, new) for key in tensors.tensors if old in key}


def replace_experts(model: nn.Module, tensors: CheckpointTensors, layout, make_linear, prefix: str = "",
                    streamed: str = "") -> int:
    """Swap every fused experts module for per-expert ReferenceLinear layers built by
    `make_linear(exported_prefix)`; returns how many blocks were replaced. `model` is named `prefix` in the
    whole model (one decoder layer, built on its own); the layers under `streamed` are built later."""
    replaced = 0
    for local, module in list(model.named_modules()):
        name = f"{prefix}.{local}" if prefix and local else prefix or local
        if not is_fused_experts(module) or (streamed and name.startswith(f"{streamed}.")):
            continue
        exported = name.replace(".mlp.experts", f".{layout.block}.experts")
        experts = []
        for e in range(module.num_experts):
            names = [f"{exported}.{e}.{proj}" for proj in (layout.gate, layout.up, layout.down)]
            missing = [n for n in names if f"{n}.weight" not in tensors]
            if missing:
                raise ValueError(f"the checkpoint has no {missing[0]}.weight for the experts of {name}")
            experts.append(tuple(make_linear(n) for n in names))
            for n in names:
                tensors.take_layer(n)
        replace_module(model, local, ReferenceExperts(experts, module.act_fn))
        replaced += 1
    return replaced


def fused_source_experts(stored: dict[str, torch.Tensor], layout) -> dict[str, torch.Tensor]:
    """One decoder layer's source tensors (names local to the layer) as transformers 5 loads them: per-expert
    gate/up/down stacked into the fused `mlp.experts.gate_up_proj` [experts, 2 x width, hidden] (gate rows
    first) and `mlp.experts.down_proj`, the block renamed to `mlp` (its conversion mapping for Mixtral and
    Qwen-MoE: the same bytes, stacked). A source already stored fused comes back as it is."""
    block, tensors = f"{layout.block}.", {}
    for key, tensor in stored.items():
        tensors["mlp." + key[len(block):] if key.startswith(block) else key] = tensor

    def expert(e: int, proj: str) -> str:
        return f"mlp.experts.{e}.{proj}.weight"

    count = 0
    while expert(count, layout.gate) in tensors:
        count += 1
    if count == 0:
        return tensors
    gate_up = [torch.cat([tensors.pop(expert(e, layout.gate)), tensors.pop(expert(e, layout.up))]) for e in range(count)]
    tensors["mlp.experts.gate_up_proj"] = torch.stack(gate_up)
    tensors["mlp.experts.down_proj"] = torch.stack([tensors.pop(expert(e, layout.down)) for e in range(count)])
    return tensors
