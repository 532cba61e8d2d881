"""Records the validate stage writes and others read; no torch here, so cached builds stay fast."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# One block of float32 logits stays under this (kiln.validate.heads): 128 positions of Gemma 3's vocabulary, a
# whole 512-token sample of a 49k one. The memory estimate (kiln check) reads it too.
LOGIT_BLOCK_BYTES = 128 << 20   # in the validate key only when a recipe names tasks


@dataclass(frozen=True)
class Metrics:
    tokens: int
    baseline_ppl: float
    quantized_ppl: float
    ppl_increase_pct: float
    mean_kl: float              # KL(baseline || quantized) per next-token distribution, nats
    top1_agreement: float       # fraction of positions whose argmax agrees

    def as_dict(self) -> dict:
        return asdict(self)
