"""Recipe gates: does a variant's accuracy allow publishing it?"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kiln.validate.records import Metrics
from kiln.validate.structure import StructureReport
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


_MEASURES = (("max_ppl_increase_pct", "ppl_increase_pct"), ("max_kl", "mean_kl"),
             ("min_top1_agreement", "top1_agreement"))


def evaluate_gates(metrics: Metrics, max_ppl_increase_pct=None, max_kl=None, min_top1_agreement=None,
                   max_task_drop=None, tasks: dict[str, TaskDrop] | None = None,
                   structure: StructureReport | None = None) -> GateResult:
    """`tasks` (the variant's task drops) is given where tasks were scored: the checkpoint, not an engine.
    `structure` (the checkpoint's structure checks) likewise: a checkpoint that fails them fails with their lines
    alone, since its metrics were not measured.

    What could not be measured never passes: a metric that is NaN or infinite fails (whether or not the recipe
    gates it: a checkpoint whose perplexity is NaN is broken), and so does a task bound the task's documents
    cannot decide (module doc of kiln.validate.tasks, `TaskDrop.unmeasured`)."""
    if structure is not None and not structure.passed:
        return GateResult(False, tuple(f"structure: {problem}" for problem in structure.problems))
    failures, noise, finite = [], [], set()
    for gate, field in _MEASURES:
        value = getattr(metrics, field)
        if math.isfinite(value):
            finite.add(field)
        else:
            failures.append(f"{gate}: {field} is {value}: it could not be measured, so no gate can pass (the "
                            "checkpoint's outputs or the baseline's are not finite)")
    if max_ppl_increase_pct is not None and "ppl_increase_pct" in finite and \
            metrics.ppl_increase_pct > max_ppl_increase_pct:
        over = metrics.ppl_increase_pct - max_ppl_increase_pct
        failures.append(f"max_ppl_increase_pct: {metrics.ppl_increase_pct:.3f} > {max_ppl_increase_pct:g} (over by {over:.3f})")
    if max_kl is not None and "mean_kl" in finite and metrics.mean_kl > max_kl:
        failures.append(f"max_kl: {metrics.mean_kl:.5f} > {max_kl:g} (over by {metrics.mean_kl - max_kl:.5f})")
    if min_top1_agreement is not None and "top1_agreement" in finite and metrics.top1_agreement < min_top1_agreement:
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
        elif drop.unmeasured is not None:
            failures.append(f"max_task_drop.{task}: {drop.describe()}: {drop.unmeasured}, so the gate cannot pass")
        elif drop.drop_points > bound:
            noisy = ", within its standard error: score more documents to tell" if drop.within_noise else ""
            failures.append(f"max_task_drop.{task}: {drop.describe()} > {bound:g} (over by "
                            f"{drop.drop_points - bound:.2f}{noisy})")
        elif drop.drop_points + drop.drop_stderr_points > bound:
            failures.append(f"max_task_drop.{task}: {drop.describe()}: {drop.n} documents are too few to bound the drop "
                            f"at {bound:g} (it may be up to {drop.drop_points + drop.drop_stderr_points:.2f} within one "
                            "standard error; fix: raise the task's limit, or the bound)")
        elif drop.within_noise:
            noise.append(f"max_task_drop.{task}: {drop.describe()}, within its standard error and under {bound:g} "
                         "by more than it")
    return GateResult(not failures, tuple(failures), tuple(noise))
