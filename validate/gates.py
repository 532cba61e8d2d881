"""Recipe gates: does a variant's accuracy allow publishing it?"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.validate.records import Metrics
from kiln.validate.tasks import TaskDrop


@dataclass(frozen=True)
class GateResult:
    passed: bool
    failures: tuple[str, ...]
    within_noise: tuple[str, ...] = ()   # task bounds a drop passed or crossed by less than its standard error

    def as_dict(self) -> dict:
        found = {"passed": self.passed, "failures": list(self.failures)}
        return {**found, "within_noise": list(self.within_noise)} if self.within_noise else found

    def summary(self) -> str:
        return "pass" if self.passed else "FAIL " + "; ".join(self.failures)


def evaluate_gates(metrics: Metrics, max_ppl_increase_pct=None, max_kl=None, min_top1_agreement=None,
                   max_task_drop=None, tasks: dict[str, TaskDrop] | None = None) -> GateResult:
    """`tasks` (the variant's task drops) is given where tasks were scored: the checkpoint, not an engine."""
    failures, noise = [], []
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
    for task, bound in sorted((max_task_drop or {}).items()):
        drop = (tasks or {}).get(task)
        if tasks is None:
            continue
        if drop is None:
            failures.append(f"max_task_drop.{task}: the task was not scored")
        elif drop.within_noise:
            noise.append(f"max_task_drop.{task}: {drop.describe()}, within its standard error: neither a pass nor a "
                         f"fail at {bound:g}")
        elif drop.drop_points > bound:
            failures.append(f"max_task_drop.{task}: {drop.describe()} > {bound:g} (over by "
                            f"{drop.drop_points - bound:.2f})")
    return GateResult(not failures, tuple(failures), tuple(noise))
