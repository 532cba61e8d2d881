"""Records the validate stage writes and others read; no torch here, so cached builds stay fast."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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
