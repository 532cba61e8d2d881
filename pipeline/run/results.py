"""What a build produced, per variant and per SM: the documents `kiln build` prints and returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from kiln import quantize, registry, validate
from kiln.pipeline.plan.dag import Plan
from kiln.pipeline.plan.stages import StageInstance, Target


@dataclass
class TargetResult:
    """One SM's engines (compile -> engine check) or one runtime's check of a variant: how it went, what it
    measured, its gate and whether its result is on the variant's version."""

    target: Target                   # variant@sm or variant@runtime
    status: str                      # built, checked, cached, or "skipped: reason"
    metrics: validate.Metrics | None = None
    gate: validate.GateResult | None = None
    published: bool = False
    report: validate.RuntimeReport | None = None   # a runtime check's full report (its metrics, greedy agreement)

    @property
    def sm(self) -> str | None:
        return self.target.sm

    @property
    def runtime(self) -> str | None:
        return self.target.runtime

    def as_dict(self) -> dict:
        place = {"sm": self.sm} if self.sm else {"runtime": self.runtime}
        measured = ({"metrics": self.metrics.as_dict() if self.metrics else None} if self.sm
                    else {"report": self.report.as_dict() if self.report else None})
        return {**place, "status": self.status, **measured, "gate": self.gate.as_dict() if self.gate else None,
                "published": self.published}


def format_label(quant: str | None, kv_cache: str | None, backend: str | None = None,
                 auto_bits: float | str | None = None) -> str:
    """A variant's format as tables show it: int4_gptq, fp8 + kv fp8, int8_sq (llmcompressor), auto 5.5b (quant
    auto's budget)."""
    kv = "" if kv_cache in (None, "none") else f" + kv {kv_cache}"
    made = "" if backend in (None, "modelopt") else f" ({backend})"
    budget = "" if auto_bits in (None, "") else f" {float(auto_bits):g}b"
    return (quant or "-") + budget + kv + made


@dataclass
class CandidateResult:
    """One budget of a quant-auto size search: what it measured and whether it passed the gates."""

    bits: float
    size: quantize.CheckpointSize
    metrics: validate.Metrics
    gate: validate.GateResult
    estimated_score: float | None = None   # ModelOpt's sum of the chosen formats' layer scores (its kiln.json)

    def as_dict(self) -> dict:
        return {"effective_bits": self.bits, "size": self.size.as_dict(), "metrics": self.metrics.as_dict(),
                "gate": self.gate.as_dict(), "estimated_score": self.estimated_score}

    def summary(self) -> dict:
        """What the published version records of it (registry tags), and the figure draws."""
        return {"effective_bits": self.bits, "bits_per_weight": self.size.bits_per_weight,
                "mean_kl": self.metrics.mean_kl, "passed": self.gate.passed,
                **({"estimated_score": self.estimated_score} if self.estimated_score is not None else {})}


@dataclass
class VariantResult:
    variant: str
    quant: str
    kv_cache: str
    backend: str = "modelopt"
    metrics: validate.Metrics | None = None
    gate: validate.GateResult | None = None
    published: registry.PublishedVersion | None = None
    trtllm_corrections: list[dict] = field(default_factory=list)
    engines: list[TargetResult] = field(default_factory=list)
    runtime_checks: list[TargetResult] = field(default_factory=list)
    size: quantize.CheckpointSize | None = None
    tasks: dict[str, validate.TaskDrop] | None = None   # evaluation.tasks' drops against the baseline
    candidates: list[CandidateResult] = field(default_factory=list)   # a size search's, smallest first
    # quant auto: every budget the score stage solved (quantize.auto_precision.frontier), built or not
    frontier: list[dict] = field(default_factory=list)
    auto_bits: float | None = None   # quant auto: the budget of the checkpoint it holds
    structure: validate.StructureReport | None = None   # the exported files' structure checks

    @property
    def format(self) -> str:
        return format_label(self.quant, self.kv_cache, self.backend, self.auto_bits)

    def as_dict(self) -> dict:
        return {
            "variant": self.variant,
            "quant": self.quant,
            "kv_cache": self.kv_cache,
            "backend": self.backend,
            "metrics": self.metrics.as_dict() if self.metrics else None,
            "size": self.size.as_dict() if self.size else None,
            "gate": self.gate.as_dict() if self.gate else None,
            "structure": self.structure.as_dict() if self.structure else None,
            **({"tasks": {name: asdict(drop) for name, drop in self.tasks.items()}} if self.tasks else {}),
            "registry": self.published.as_dict() if self.published else None,
            "upload": self.published.transfer.as_dict() if self.published and self.published.transfer else None,
            "trtllm_corrections": self.trtllm_corrections,
            "engines": [e.as_dict() for e in self.engines],
            "runtime_checks": [c.as_dict() for c in self.runtime_checks],
            **({"candidates": [c.as_dict() for c in self.candidates]} if self.candidates else {}),
            **({"frontier": self.frontier} if self.frontier else {}),
        }


@dataclass
class BuildResult:
    plan: Plan
    variants: list[VariantResult]
    ran: list[StageInstance]

    @property
    def exit_code(self) -> int:
        gates = [v.gate for v in self.variants] + [e.gate for v in self.variants for e in v.engines] + \
            [c.gate for v in self.variants for c in v.runtime_checks]
        return 3 if any(g is not None and not g.passed for g in gates) else 0
