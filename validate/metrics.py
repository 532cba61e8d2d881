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


# Samples run through a model together while their float32 logits stay under this: batching makes the
# CPU's matrix products faster (measured 18 % on a 0.45B model, 1 -> 4 samples of 256 tokens), and a
# 128k vocabulary still gets one sample at a time.
BATCH_LOGITS_BYTES = 256 << 20


@torch.no_grad()
def batched_logits(model: nn.Module, samples: torch.Tensor):
    """(i, float32 logits [seq, vocab] on the CPU) for each row of `samples` [n, seq], in batches."""
    embedding = model.get_input_embeddings().weight
    device = embedding.device if embedding.device.type != "meta" else samples.device
    vocab = model.config.get_text_config().vocab_size
    per_batch = max(1, BATCH_LOGITS_BYTES // (samples.shape[1] * vocab * 4))
    for start in range(0, samples.shape[0], per_batch):
        logits = model(input_ids=samples[start:start + per_batch].to(device)).logits
        for offset, row in enumerate(logits.to(device="cpu", dtype=torch.float32)):
            yield start + offset, row


@torch.no_grad()
def compare(baseline_logits, candidate, samples: torch.Tensor, on_sample=lambda: None) -> Metrics:
    """`baseline_logits(i)` gives the baseline's logits for sample i (so they can be cached).

    `candidate` is a model (run on batches of samples), or a function from token ids to logits
    [seq, vocab] (a TensorRT-LLM engine, one sample at a time).
    """
    if isinstance(candidate, nn.Module):
        outputs = batched_logits(candidate, samples)
    else:
        outputs = ((i, candidate(ids)) for i, ids in enumerate(samples))
    nll_base = nll_quant = kl_sum = agree = 0.0
    count = 0
    for i, logits in outputs:
        ids = samples[i]
        targets = ids[1:]
        reference = baseline_logits(i)
        logits = logits.to(torch.float32)
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
