"""How many calibration tokens each mixture-of-experts expert received (issue 39.2).

An expert no calibration token reaches keeps default or NaN scales, and the evaluation text may never route to it
either: a checkpoint that measures well and answers some prompts with token salad. kiln counts, per MoE block, the
experts its router picks on the block's first pass over the calibration set (what every format's statistics come
from) and records the table in kiln.json; the validate stage's structure checks refuse a block whose expert got
fewer than `calibration.min_expert_tokens`. ModelOpt's remedy is `moe_calib_experts_ratio` in its algorithm config
(0.47, modelopt/torch/quantization/config.py): during calibration every token also goes through that share of the
experts, the outputs unchanged; `calibration.all_experts: true` sets it to 1.0, and the table then shows what the
experts saw. ModelOpt applies it only to blocks whose experts are separate modules: transformers 5's fused experts
(Mixtral's MixtralExperts, one 3-D weight) are not its _QuantSparseSequentialMoe, and the ratio silently does
nothing there (measured on the Mixtral test model: the table stayed [2, 0, 2, 0]). For those kiln does what ModelOpt
does for the others (every_expert_calibrated).
"""

from __future__ import annotations

import contextlib
from functools import partial

COUNT_ATTRIBUTES = ("num_experts", "n_routed_experts", "num_local_experts")


def moe_blocks(model) -> list[tuple[str, object, int]]:
    """(name, block, number of experts) of every module with a router (`gate`) and `experts`."""
    from torch import nn

    blocks = []
    for name, module in model.named_modules():
        gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        if not isinstance(gate, nn.Module) or not isinstance(experts, nn.Module):
            continue
        count = next((getattr(owner, attribute) for owner in (gate, module, experts) for attribute in COUNT_ATTRIBUTES
                      if isinstance(getattr(owner, attribute, None), int)), None)
        if count is None and isinstance(experts, nn.ModuleList):
            count = len(experts)
        if count:
            blocks.append((name, module, count))
    return blocks


class ExpertTokens:
    """Router hooks counting the tokens routed to each expert on its block's first pass over the calibration set: the
    block's first `first_pass` forwards. That is the first pass of a whole-model calibration (AWQ's later passes
    search scales on its statistics), and each block's first replay when ModelOpt calibrates a layer at a time."""

    def __init__(self, model, first_pass: int):
        import torch

        self.first_pass = first_pass
        blocks = moe_blocks(model)
        self.counts = {name: torch.zeros(count, dtype=torch.long) for name, _, count in blocks}
        self.calls = {name: 0 for name, _, _ in blocks}
        self._hooks = [hook for name, block, _ in blocks for hook in (
            block.register_forward_pre_hook(partial(self._called, name)),
            block.gate.register_forward_hook(partial(self._count, name, block)))]

    def _called(self, name: str, block, args) -> None:
        self.calls[name] += 1

    def _count(self, name: str, block, router, inputs, output) -> None:
        import torch

        if self.calls[name] > self.first_pass:
            return
        if isinstance(output, tuple) and len(output) >= 3:   # transformers 5's routers: (logits, scores, indices)
            indices = output[2]
        else:                                                 # a linear router: its logits
            logits = output[0] if isinstance(output, tuple) else output
            top_k = getattr(router, "top_k", None) or getattr(block, "top_k", 1)
            indices = torch.topk(logits.float(), top_k, dim=-1).indices
        counts = self.counts[name]
        counts += torch.bincount(indices.reshape(-1).cpu(), minlength=len(counts))[: len(counts)]

    def table(self) -> dict[str, list[int]]:
        return {name: [int(c) for c in counts] for name, counts in self.counts.items()}

    def state(self) -> dict:
        """What a resumed calibration needs to count on where this one stopped (quantize/resume.py)."""
        return {"expert_tokens": self.table(), "expert_block_calls": dict(self.calls)}

    def restore(self, state: dict) -> None:
        import torch

        for name, counts in (state.get("expert_tokens") or {}).items():
            if name in self.counts:
                self.counts[name] = torch.tensor(counts, dtype=torch.long)
        self.calls.update({name: calls for name, calls in (state.get("expert_block_calls") or {}).items()
                           if name in self.calls})

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


@contextlib.contextmanager
def every_expert_calibrated(model):
    """ModelOpt's moe_calib_experts_ratio 1.0 for the fused-expert blocks it does not reach: each calibration forward
    first runs the block with its router widened to every expert (its output dropped, so every expert's quantizers
    see every token), then as routed (the output the next layer gets)."""
    patched = []
    for _, block, count in moe_blocks(model):
        if hasattr(block.experts, "__iter__") or not hasattr(block.gate, "top_k"):
            continue   # separate expert modules: ModelOpt's own ratio applies
        hooked = block.__dict__.get("forward")   # accelerate's offload hook, where it set one: kept and restored
        block.forward = partial(_every_expert_then_routed, block, count, hooked)
        patched.append((block, hooked))
    try:
        yield
    finally:
        for block, hooked in patched:
            if hooked is None:
                del block.forward
            else:
                block.forward = hooked


def _every_expert_then_routed(block, experts: int, hooked, *args, **kwargs):
    # The class's forward is looked up per call: ModelOpt may have converted the block's class.
    forward = hooked or partial(type(block).forward, block)
    routed = block.gate.top_k
    block.gate.top_k = experts
    try:
        forward(*args, **kwargs)
    finally:
        block.gate.top_k = routed
    return forward(*args, **kwargs)

