"""The measuring stages of a checkpoint: validate (against the baseline, and the recipe's tasks), the
unquantized model's task scores (task-baseline, once per model and task list) and the checkpoint's size.
Each runs into the cache entry the plan keyed for it."""

from __future__ import annotations

import json
from pathlib import Path

from kiln import quantize, validate
from kiln.common.errors import UserInputError
from kiln.pipeline.data.tasks import task_code_lines, task_requests
from kiln.pipeline.plan.dag import SIZE_RECORD
from kiln.pipeline.plan.requests import structure_expectation, validate_request
from kiln.pipeline.plan.stages import StageInstance
from kiln.pipeline.run.context import BuildContext


class MeasureStages:
    """validate(variant), task-baseline(model) and size(variant) of a build."""

    def __init__(self, context: BuildContext):
        self.context = context
        self.plan, self.progress, self.loaded = context.plan, context.progress, context.loaded
        self.request = validate_request(self.loaded)
        self._task_requests: list | None = None

    def validate(self, name: str, instance: StageInstance, checkpoint: Path):
        """(metrics, task drops or None, structure report) of the exported checkpoint: its structure checked
        against the source first; measured against the baseline only when that passes."""
        context = self.context

        def build(out: Path) -> None:
            recipe = self.loaded.recipe
            expected = structure_expectation(quantize.CheckpointRecord.load(checkpoint),
                                             recipe.calibration.min_expert_tokens, recipe.model.trust_remote_code,
                                             recipe.evaluation.allow_differences)
            structure = validate.check_structure(checkpoint / quantize.HF_DIR, context.model_dir(), expected)
            validate.write_structure(structure, out)
            for difference in structure.allowed:
                self.progress.log(f"{name}: structure: allowed by evaluation.allow_differences: {difference}")
            if not structure.passed:
                for problem in structure.problems:
                    self.progress.log(f"{name}: structure check failed: {problem}")
                validate.write_metrics(validate.UNMEASURED, out)
                return
            metrics = validate.run(checkpoint / quantize.HF_DIR, context.baseline(), context.samples("evaluation"),
                                   self.progress, name, placement=context.placement())
            quantize.release_memory()
            drops = None
            if self.loaded.recipe.evaluation.tasks:
                scores = self._run_tasks(checkpoint / quantize.HF_DIR, baseline=False, label=name)
                drops = validate.compare_tasks(self.task_baseline(), scores)
            validate.write_metrics(metrics, out)
            if drops is not None:
                validate.write_task_drops(drops, out)

        entry = context.get_or_build(instance, build)
        return validate.load_metrics(entry), validate.load_task_drops(entry), validate.load_structure(entry)

    def task_baseline(self) -> dict:
        """The unquantized model's task scores: computed once per model and task list, then cached."""
        def build(out: Path) -> None:
            validate.write_task_scores(self._run_tasks(self.context.model_dir(), baseline=True, label="baseline"), out)

        entry = self.context.get_or_build(self.plan.instance("task-baseline", "model"), build)
        return validate.load_task_scores(entry)

    def _run_tasks(self, model: Path, baseline: bool, label: str) -> dict:
        if self._task_requests is None:
            self._task_requests = task_requests(self.loaded, self.plan.evaluation.documents)
            if self.request.allow_code_execution and any(r.unsafe_code for r in self._task_requests):
                self.progress.log(f"running generated code as the recipe allows: {validate.sandbox_description()}")
            for line in task_code_lines(self._task_requests):
                self.progress.log(line)
        try:
            scores = validate.run_tasks(model, self._task_requests, self.request, baseline=baseline,
                                        progress=self.progress, label=label, tokenizer=self.context.model_dir())
        except (ValueError, PermissionError) as exc:
            raise UserInputError(f"{self.loaded.path}: evaluation.tasks: {exc}") from None
        except ImportError as exc:   # kiln check says so too; a build from a bare install gets the same line
            raise UserInputError(f"{self.loaded.path}: evaluation.tasks need lm-evaluation-harness ({exc.name} is "
                                 "not installed; fix: pip install 'kiln[eval]')") from None
        quantize.release_memory()
        return scores

    def size(self, checkpoint: Path) -> quantize.CheckpointSize:
        """The checkpoint's bytes and bits per weight, measured once per checkpoint (it reads the source
        model's headers, which a cached rebuild should not need again). The size entry is keyed by the
        quantize entry it measures, whose folder is its key."""
        instance = next(i for i in self.plan.instances if i.stage == "size" and i.key == checkpoint.name)

        def build(out: Path) -> None:
            size = quantize.checkpoint_size(checkpoint / quantize.HF_DIR, self.context.model_dir())
            (out / SIZE_RECORD).write_text(json.dumps(size.as_dict(), indent=2) + "\n")

        entry = self.context.get_or_build(instance, build)
        return quantize.CheckpointSize(**json.loads((entry / SIZE_RECORD).read_text()))
