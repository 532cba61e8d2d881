"""Accuracy of a quantized model against its baseline on held-out text."""

from __future__ import annotations

import math

import torch
from torch import nn

from kiln.validate.records import Metrics


@torch.no_grad()
def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.unsqueeze(0)).logits[0].to(torch.float32)


@torch.no_grad()
def compare(baseline_logits, quantized: nn.Module, samples: torch.Tensor, on_sample=lambda: None) -> Metrics:
    """`baseline_logits(i)` gives the baseline's logits for sample i (so they can be cached)."""
    nll_base = nll_quant = kl_sum = agree = 0.0
    count = 0
    for i, ids in enumerate(samples):
        targets = ids[1:]
        base = torch.log_softmax(baseline_logits(i)[:-1], dim=-1)
        quant = torch.log_softmax(logits_of(quantized, ids)[:-1], dim=-1)
        nll_base += -base.gather(1, targets[:, None]).sum().item()
        nll_quant += -quant.gather(1, targets[:, None]).sum().item()
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
