"""Recipe gates: does a variant's accuracy allow publishing it?"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.validate.records import Metrics


@dataclass(frozen=True)
class GateResult:
    passed: bool
    failures: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"passed": self.passed, "failures": list(self.failures)}

    def summary(self) -> str:
        return "pass" if self.passed else "FAIL " + "; ".join(self.failures)


def evaluate_gates(metrics: Metrics, max_ppl_increase_pct=None, max_kl=None, min_top1_agreement=None) -> GateResult:
    failures = []
    if max_ppl_increase_pct is not None and metrics.ppl_increase_pct > max_ppl_increase_pct:
        over = metrics.ppl_increase_pct - max_ppl_increase_pct
        failures.append(f"max_ppl_increase_pct: {metrics.ppl_increase_pct:.3f} > {max_ppl_increase_pct:g} (over by {over:.3f})")
    if max_kl is not None and metrics.mean_kl > max_kl:
        failures.append(f"max_kl: {metrics.mean_kl:.5f} > {max_kl:g} (over by {metrics.mean_kl - max_kl:.5f})")
    if min_top1_agreement is not None and metrics.top1_agreement < min_top1_agreement:
        under = min_top1_agreement - metrics.top1_agreement
        failures.append(
            f"min_top1_agreement: {metrics.top1_agreement:.4f} < {min_top1_agreement:g} (under by {under:.4f})"
        )
    return GateResult(not failures, tuple(failures))
