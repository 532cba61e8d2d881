"""Does kiln's reference runtime compute what ModelOpt's in-memory model computes with the files that ship (issue 42)?

ModelOpt's in-memory model is not what ships: its exporter rounds the weights twice where the fake quant
rounds once (it divides the bf16 weight by its scale in bf16 before the FP8 cast: about 3 % of the stored
codes differ), and a bf16 Gemma holds its embedding scale in bf16.
The in-memory model is therefore compared as it would be given the exported files (`as_exported`). What is left between it and the
reference runtime is the runtime's own arithmetic, and that is what the bound holds.

Used by tests/test_families.py (the seven test families) and bench/agreement.py (Gemma 3, SmolLM2).
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass

import torch
from torch import nn

# What SmolLM2-135M and Gemma 3 270M show (bench/results/agreement.md): the reference runtime's KL is within
# 1 % of the as-exported model's. The rest is rounding order: kiln rounds activations as TensorRT-LLM's kernel
# does (x / input_scale), ModelOpt as x * (448 / amax); with ModelOpt's order they agree to float rounding.
MAX_KL_RATIO_DEVIATION = 0.03


def mean_kl(reference_logits: list[torch.Tensor], logits: list[torch.Tensor]) -> float:
    """Mean per-token KL(reference || other) over the windows, in float32."""
    total = 0.0
    for e, g in zip(reference_logits, logits):
        p, q = torch.log_softmax(e.float(), -1), torch.log_softmax(g.float(), -1)
        total += (p.exp() * (p - q)).sum(-1).mean().item()
    return total / len(logits)


def logits(model: nn.Module, windows: list[torch.Tensor]) -> list[torch.Tensor]:
    from kiln.validate.metrics import logits_of

    with torch.no_grad():
        return [logits_of(model, ids) for ids in windows]


def reference_layers(reference: nn.Module) -> dict[str, nn.Module]:
    """The reference runtime's linear layers (ReferenceLinear: they decode stored tensors) by name."""
    return {name: m for name, m in reference.named_modules() if hasattr(m, "_stored") and hasattr(m, "_transform")}


def as_exported(in_memory: nn.Module, reference: nn.Module) -> tuple[nn.Module, int]:
    """A float32 copy of the in-memory model that computes with the exported files. Returns the copy and how many
    weight quantizers it replaced with stored weights."""
    copied = copy.deepcopy(in_memory).float()
    references = dict(reference.named_modules())
    with torch.no_grad():
        replaced = sum(_layer_as_exported(module, references.get(name)) for name, module in copied.named_modules())
        for name, module in copied.named_modules():
            _kv_scales_as_exported(module, references.get(name))
            _embedding_scale_in_float32(module)
        _other_tensors_as_loaded(copied, reference)
    return copied, replaced


def _layer_as_exported(module: nn.Module, theirs: nn.Module | None) -> int:
    """A quantized layer's weight becomes the decoded stored one (weight quantizer off); its AWQ input scale the
    stored one, or ones where the export folded it into the layer before; its input amax the stored input scale's
    (the export resmooths fused AWQ layers and recalibrates them). Returns how many weight quantizers it replaced."""
    if theirs is None:
        return 0
    if hasattr(module, "gate_up_proj_weight_quantizers") and hasattr(theirs, "gate"):
        return _fused_experts_as_exported(module, theirs)
    quantizer = getattr(module, "weight_quantizer", None)
    if quantizer is None or not quantizer.is_enabled or not hasattr(theirs, "_stored"):
        return 0
    stored = theirs._stored()
    module.weight.data = theirs.weight.detach().float().clone()
    pre_quant = getattr(module.input_quantizer, "_pre_quant_scale", None)
    if pre_quant is not None:
        exported = stored.get("pre_quant_scale")
        pre_quant.data = torch.ones_like(pre_quant) if exported is None else \
            exported.to(pre_quant.dtype).reshape(pre_quant.shape).clone()
    if module.input_quantizer.is_enabled and "input_scale" in stored:
        module.input_quantizer.amax = stored["input_scale"].float() * module.input_quantizer.maxbound
    quantizer.disable()
    return 1


def _fused_experts_as_exported(module: nn.Module, experts: nn.Module) -> int:
    """transformers 5's fused experts (3-D weights) given the exported per-expert layers."""
    for e in range(experts.num_experts):
        module.gate_up_proj.data[e] = torch.cat([experts.gate[e].weight, experts.up[e].weight]).float()
        module.down_proj.data[e] = experts.down[e].weight.float()
        module.gate_up_proj_weight_quantizers[e].disable()
        module.down_proj_weight_quantizers[e].disable()
    return 2 * experts.num_experts


def _kv_scales_as_exported(module: nn.Module, attention: nn.Module | None) -> None:
    """K/V-cache rounding with the exported k_scale / v_scale (the HF export writes amax / 448 unclamped; its
    TensorRT-LLM export would clamp them to at least 1.0)."""
    for which in ("k", "v"):
        quantizer = getattr(module, f"{which}_bmm_quantizer", None)
        stored = getattr(attention, f"kiln_{which}_scale", None)
        if quantizer is not None and quantizer.is_enabled and stored is not None:
            quantizer.amax = stored.float() * quantizer.maxbound


def _embedding_scale_in_float32(module: nn.Module) -> None:
    """Gemma's embedding scale: a bf16 model holds sqrt(hidden_size) rounded to bf16 (25.25 for Gemma 3's 25.298);
    kiln's baseline and reference runtime both scale by the float32 value."""
    if hasattr(module, "scalar_embed_scale") and isinstance(getattr(module, "embed_scale", None), torch.Tensor):
        module.embed_scale.data = torch.tensor(float(module.scalar_embed_scale), dtype=torch.float32)


def _other_tensors_as_loaded(copied: nn.Module, reference: nn.Module) -> None:
    """Every other tensor as the reference loaded it: the export rewrites the norms it folds AWQ scales into."""
    tensors = {**dict(reference.named_parameters()), **dict(reference.named_buffers())}
    for name, tensor in [*copied.named_parameters(), *copied.named_buffers()]:
        theirs = tensors.get(name)
        if theirs is not None and theirs.shape == tensor.shape and tensor.is_floating_point() \
                and not name.endswith("_quantizer._amax"):
            tensor.data = theirs.detach().to(tensor.dtype).clone()


@dataclass(frozen=True)
class Agreement:
    kl_in_memory: float         # ModelOpt's in-memory model as calibrated, against the unquantized model
    kl_as_exported: float       # the same model given the exported files
    kl_reference: float         # kiln's reference runtime on the exported checkpoint
    kl_between: float           # reference against the as-exported model, directly
    difference_stderr: float    # standard error of the per-window difference kl_reference - kl_as_exported
    layers_replaced: int

    @property
    def ratio(self) -> float:
        """kiln's KL over the as-exported model's: 1.0 when the runtime computes what ModelOpt would (nan when the
        as-exported model loses nothing, so no ratio says anything)."""
        return self.kl_reference / self.kl_as_exported if self.kl_as_exported else float("nan")

    @property
    def holds(self) -> bool:
        """Within the bound, or within two standard errors of the per-window differences: on a model with large
        activations (Gemma 3) an FP8 code at a rounding boundary flips with the last bit of the division, and
        single windows' KL move by up to 0.07 either way while the mean over 32 windows does not move."""
        allowed = MAX_KL_RATIO_DEVIATION * self.kl_as_exported + 2 * self.difference_stderr
        return abs(self.kl_reference - self.kl_as_exported) <= allowed

    def as_dict(self) -> dict:
        return {**self.__dict__, "ratio": self.ratio, "holds": self.holds}


def agreement(baseline: nn.Module, in_memory: nn.Module, reference: nn.Module, windows: list[torch.Tensor]) -> Agreement:
    """Compare the models against the unquantized `baseline` (kiln's float32 one) on the same windows, one window
    at a time: a 262k vocabulary's logits take 1 GiB per thousand tokens."""
    exported, replaced = as_exported(in_memory, reference)
    per_window = []
    for ids in windows:
        base, memory, shipped, ours = (logits(model, [ids]) for model in (baseline, in_memory, exported, reference))
        per_window.append((mean_kl(base, memory), mean_kl(base, shipped), mean_kl(base, ours), mean_kl(shipped, ours)))
    memory, shipped, ours, between = (statistics.fmean(column) for column in zip(*per_window))
    differences = [row[2] - row[1] for row in per_window]
    stderr = statistics.stdev(differences) / len(differences) ** 0.5 if len(differences) > 1 else 0.0
    return Agreement(memory, shipped, ours, between, stderr, replaced)
