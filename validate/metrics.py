"""Accuracy of a quantized model against its baseline on held-out text."""

from __future__ import annotations

import math

import torch
from torch import nn

from kiln.validate.records import Metrics

_POSITIONS_PER_BLOCK = 64


@torch.no_grad()
def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits [seq, vocab] on the CPU, wherever the model runs."""
    embedding = model.get_input_embeddings().weight
    device = embedding.device if embedding.device.type != "meta" else ids.device
    return model(input_ids=ids.unsqueeze(0).to(device)).logits[0].to(device="cpu", dtype=torch.float32)


@torch.no_grad()
def compare(baseline_logits, candidate, samples: torch.Tensor, on_sample=lambda: None) -> Metrics:
    """`baseline_logits(i)` gives the baseline's logits for sample i (so they can be cached).

    `candidate` is a model, or a function from token ids to logits [seq, vocab] (a TensorRT-LLM engine).
    """
    candidate_logits = candidate if not isinstance(candidate, nn.Module) else (lambda ids: logits_of(candidate, ids))
    nll_base = nll_quant = kl_sum = agree = 0.0
    count = 0
    for i, ids in enumerate(samples):
        targets = ids[1:]
        reference = baseline_logits(i)
        logits = candidate_logits(ids).to(torch.float32)
        # Engines may pad the vocabulary (to a multiple of the TP size); the padded columns are not tokens.
        if logits.shape[0] != reference.shape[0] or logits.shape[1] < reference.shape[1]:
            raise ValueError(f"sample {i}: logits of shape {tuple(logits.shape)} cannot be compared with the "
                             f"baseline's {tuple(reference.shape)}")
        # In blocks of positions: a 128k vocabulary makes each [seq, vocab] temporary hundreds of MB.
        for start in range(0, targets.numel(), _POSITIONS_PER_BLOCK):
            stop = min(start + _POSITIONS_PER_BLOCK, targets.numel())
            base = torch.log_softmax(reference[start:stop], dim=-1)
            quant = torch.log_softmax(logits[start:stop, : reference.shape[1]], dim=-1)
            block_targets = targets[start:stop, None]
            nll_base += -base.gather(1, block_targets).sum().item()
            nll_quant += -quant.gather(1, block_targets).sum().item()
            kl_sum += (base.exp() * (base - quant)).sum().item()
            agree += (base.argmax(-1) == quant.argmax(-1)).sum().item()
        count += targets.numel()
        on_sample()
    base_ppl = math.exp(nll_base / count)
    quant_ppl = math.exp(nll_quant / count)
    return Metrics(
        tokens=count,
        baseline_ppl=base_ppl,
        quantized_ppl=quant_ppl,
        ppl_increase_pct=(quant_ppl / base_ppl - 1.0) * 100.0,
        mean_kl=max(kl_sum / count, 0.0),
        top1_agreement=agree / count,
    )
