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


# What a checkpoint that failed its structure checks records: nothing was measured.
UNMEASURED = Metrics(tokens=0, baseline_ppl=float("nan"), quantized_ppl=float("nan"), ppl_increase_pct=float("nan"),
                     mean_kl=float("nan"), top1_agreement=float("nan"))


@dataclass(frozen=True)
class RuntimeReport:
    """What a runtime check measured (kiln.validate.vllm_check; any runtime's check writes one): the published
    checkpoint's metrics in that runtime against the unquantized baseline, and its greedy tokens against the
    reference runtime's."""

    runtime: str                   # the loader checked (a kiln.quantize.Runtime value: "vllm")
    version: str                   # its version as installed
    device: str
    metrics: Metrics
    greedy_agreement: float        # share of prompts whose greedy tokens equal the reference runtime's
    greedy: list[dict]             # per prompt: its tokens, the runtime's ("served") and the reference's continuation

    def as_dict(self) -> dict:
        return {**asdict(self), "metrics": self.metrics.as_dict()}

    @classmethod
    def from_dict(cls, document: dict) -> "RuntimeReport":
        if "vllm" in document:   # a report cached before checks were runtime-neutral: vLLM's, keyed by its name
            document = {**{key: value for key, value in document.items() if key != "vllm"},
                        "runtime": "vllm", "version": document["vllm"],
                        "greedy": [{("served" if key == "vllm" else key): value for key, value in prompt.items()}
                                   for prompt in document.get("greedy", [])]}
        return cls(**{**document, "metrics": Metrics(**document["metrics"])})

