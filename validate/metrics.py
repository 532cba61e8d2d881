"""Accuracy of a quantized model against its baseline on held-out text.

Logits are never held for a whole sample: a model's body runs once per sample and its output head
is applied to a block of positions at a time (kiln.validate.heads), so memory grows with neither
positions x vocabulary nor the number of samples (Gemma 3: 262,144 columns).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kiln.validate.heads import SampleLogits, head_outputs
from kiln.validate.records import Metrics


@torch.no_grad()
def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits [seq, vocab] on the CPU, wherever the model runs."""
    embedding = model.get_input_embeddings().weight
    device = embedding.device if embedding.device.type != "meta" else ids.device
    return model(input_ids=ids.unsqueeze(0).to(device)).logits[0].to(device="cpu", dtype=torch.float32)


@torch.no_grad()
def compare(baseline_logits, candidate, samples: torch.Tensor, on_sample=lambda: None) -> Metrics:
    """`baseline_logits(i)` gives the baseline's SampleLogits for sample i (so they can be cached).

    `candidate` is a model (run on batches of samples, its head applied per block of positions), a
    function from token ids to logits [seq, vocab] (a TensorRT-LLM engine, one sample at a time), or
    the (i, SampleLogits) pairs themselves (a model run one layer at a time, kiln.validate.layerwise).
    """
    if isinstance(candidate, nn.Module):
        outputs = head_outputs(candidate, samples)
    elif callable(candidate):
        outputs = ((i, SampleLogits.full(candidate(ids))) for i, ids in enumerate(samples))
    else:
        outputs = candidate
    nll_base = nll_quant = kl_sum = agree = 0.0
    count = 0
    for i, logits in outputs:
        targets = samples[i][1:]
        reference = baseline_logits(i)
        # Engines may pad the vocabulary (to a multiple of the TP size); the padded columns are not tokens.
        if logits.positions != reference.positions or logits.vocab < reference.vocab:
            raise ValueError(f"sample {i}: logits of shape {(logits.positions, logits.vocab)} cannot be compared "
                             f"with the baseline's {(reference.positions, reference.vocab)}")
        for start, stop in reference.blocks(targets.numel()):
            base = torch.log_softmax(reference.block(start, stop), dim=-1)
            quant = torch.log_softmax(logits.block(start, stop)[:, : reference.vocab], dim=-1)
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
