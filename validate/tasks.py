"""Task-level accuracy: lm-evaluation-harness tasks run on the baseline and on what ships.

A task is an lm-eval task config (kiln's builtins, kiln.validate.builtin_tasks, or a task YAML whose
data is local) and the metric gates read. `run_tasks` scores one model through kiln's lm-eval model
(kiln.validate.lm_eval_model), keeping each document's score so a drop gets a paired standard error:
the same documents are scored by the baseline and the variant, so the noise that matters is that of
the per-document differences, sd(baseline_i - variant_i) / sqrt(n).

A gate `max_task_drop: B` passes only when the drop plus that standard error is at most B: a task scored on
too few documents has an error bar wider than the room under B, and fails as undecided rather than passing as
"within noise"; a task scored on fewer than MIN_DOCUMENTS documents, or whose score is not a number, fails.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from kiln.validate.task_config import TaskFiles
from kiln.validate.request import ValidateRequest

TASKS_FILE = "tasks.json"               # a variant's drops, beside report.json in its validate entry
SCORES_FILE = "task_scores.json"        # one model's scores (the baseline's, cached once)
TOOLS = ("lm_eval", "datasets")
MIN_DOCUMENTS = 2                       # fewer gives no paired standard error: a gate cannot be decided


@dataclass(frozen=True)
class TaskRequest:
    name: str
    config: dict | str           # an lm-eval task config, or the path of a task YAML (its `task:` is `name`)
    metric: str                  # the score gates read, e.g. acc, pass_at_1
    limit: int | None = None     # the first N documents
    num_fewshot: int | None = None
    unsafe_code: bool = False    # runs generated code (the recipe must opt in)
    max_new_tokens: int | None = None
    files: TaskFiles | None = None   # a task YAML's files (kiln.validate.task_config): lm-eval gets a copy of these


@dataclass(frozen=True)
class TaskScore:
    name: str
    metric: str
    value: float                 # 0..1, as lm-eval reports it
    stderr: float                # lm-eval's standard error of `value`
    per_doc: tuple[float, ...]   # each document's score, in document order

    @property
    def n(self) -> int:
        return len(self.per_doc)


@dataclass(frozen=True)
class TaskDrop:
    """A variant's score against the baseline's, in percentage points (positive: the variant scores lower)."""

    name: str
    metric: str
    baseline: float
    value: float
    stderr: float                # of `value`, lm-eval's
    drop_points: float
    drop_stderr_points: float    # paired, from the per-document differences
    n: int

    @property
    def unmeasured(self) -> str | None:
        """Why this drop says nothing (a score that is not a number, or too few documents for a standard error),
        or None. A paired standard error needs two documents: with one, a 100-point drop has no error bar."""
        if self.n < MIN_DOCUMENTS:
            return f"scored on {self.n} document(s), and a standard error needs at least {MIN_DOCUMENTS}"
        values = (self.baseline, self.value, self.drop_points, self.drop_stderr_points)
        if not all(math.isfinite(v) for v in values):
            return "a score or its standard error is not finite"
        return None

    @property
    def within_noise(self) -> bool:
        """A drop no larger than its standard error says nothing either way (identical answers are not noise)."""
        return 0 < self.drop_stderr_points and abs(self.drop_points) <= self.drop_stderr_points

    def describe(self) -> str:
        return (f"{self.name} {self.metric} {self.value * 100:.1f} against {self.baseline * 100:.1f}: drop "
                f"{self.drop_points:+.2f} ± {self.drop_stderr_points:.2f} points (n={self.n})")

    def as_metrics(self) -> dict[str, float]:
        """MLflow-safe metric names: task.<name>.<metric>, its standard error, the baseline's and the drop."""
        prefix = f"task.{self.name}.{self.metric}"
        return {prefix: self.value, f"{prefix}_stderr": self.stderr, f"{prefix}_baseline": self.baseline,
                f"{prefix}_drop_points": self.drop_points, f"{prefix}_drop_stderr_points": self.drop_stderr_points}


def run_tasks(model_path: Path, requests: list[TaskRequest], settings: ValidateRequest, *, baseline: bool,
              progress=None, label: str = "", tokenizer: Path | None = None,
              batch_size: int | None = None) -> dict[str, TaskScore]:
    """Each task's score on one model: the exported checkpoint folder, or the source with `baseline`.
    `settings` says whether generated code may run and whether the model's own code may."""
    import contextlib

    allow_code_execution = settings.allow_code_execution
    refused = [r.name for r in requests if r.unsafe_code and not allow_code_execution]
    if refused:
        raise PermissionError(f"task(s) {', '.join(refused)} run generated code; set evaluation.allow_code_execution: "
                              "true to allow it (kiln.validate.sandbox says what holds it in)")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import logging

    import lm_eval
    from lm_eval.tasks import TaskManager

    from kiln.validate.lm_eval_model import KilnLM

    for name in ("lm-eval", "lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # lm-eval records the git commit of the working directory (it assumes its own checkout) and lets git print
    # "fatal: not a git repository" elsewhere; kiln records its tools' versions itself.
    import lm_eval.evaluator

    lm_eval.evaluator.get_git_commit_hash = lambda: None
    model = KilnLM(str(model_path), baseline=baseline, trust_remote_code=settings.trust_remote_code,
                   tokenizer=str(tokenizer) if tokenizer else None, batch_size=batch_size)
    scores = {}
    task = progress.task(f"tasks {label}".strip(), total=len(requests)) if progress else contextlib.nullcontext()
    with task as bar:
        for request in requests:
            scores[request.name] = _score(lm_eval, TaskManager, model, request, allow_code_execution)
            if progress:
                bar.advance()
    del model
    return scores


def _score(lm_eval, task_manager_type, model, request: TaskRequest, allow_code_execution: bool) -> TaskScore:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kiln-task-") as staging:
        # lm-eval opens every YAML of the folder it is given: it gets a copy of this task's own files, no others.
        folder = request.files.stage(Path(staging)).parent if request.files is not None else None
        if folder is not None:
            manager = task_manager_type(include_path=str(folder), include_defaults=False, verbosity="ERROR")
            tasks = [request.name]
        else:
            manager, tasks = task_manager_type(include_defaults=False, verbosity="ERROR"), [dict(request.config)]
        # A task YAML's local data files are relative to the YAML (datasets reads them relative to the working folder).
        previous = os.getcwd()
        try:
            if folder is not None:
                os.chdir(folder)
            out = _evaluate(lm_eval, model, tasks, manager, request, allow_code_execution)
        finally:
            os.chdir(previous)
    if request.name not in out["results"]:
        raise ValueError(f"task {request.name}: lm-eval reported {sorted(out['results'])}, not {request.name}")
    result = out["results"][request.name]
    key = f"{request.metric},none"
    if key not in result:
        known = sorted(k.split(",")[0] for k in result if "," in k and "_stderr" not in k)
        raise ValueError(f"task {request.name} reports no metric {request.metric!r} (it reports {', '.join(known)})")
    docs = sorted(out["samples"][request.name], key=lambda s: s["doc_id"])
    stderr = result.get(f"{request.metric}_stderr,none")
    return TaskScore(request.name, request.metric, float(result[key]),
                     float(stderr) if isinstance(stderr, (int, float)) else float("nan"),
                     tuple(float(d[request.metric]) for d in docs))


def _evaluate(lm_eval, model, tasks, manager, request: TaskRequest, allow_code_execution: bool) -> dict:
    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=manager, limit=request.limit,
                                   num_fewshot=request.num_fewshot, bootstrap_iters=1000, log_samples=True,
                                   gen_kwargs={"max_gen_toks": request.max_new_tokens} if request.max_new_tokens else None,
                                   confirm_run_unsafe_code=allow_code_execution, verbosity="ERROR")


def compare_tasks(baseline: dict[str, TaskScore], variant: dict[str, TaskScore]) -> dict[str, TaskDrop]:
    drops = {}
    for name, score in variant.items():
        base = baseline[name]
        if base.n != score.n:
            raise ValueError(f"task {name}: the baseline scored {base.n} documents, the variant {score.n}")
        diffs = [b - v for b, v in zip(base.per_doc, score.per_doc)]
        mean = sum(diffs) / len(diffs)
        spread = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) if len(diffs) > 1 else math.inf
        drops[name] = TaskDrop(name, score.metric, base.value, score.value, score.stderr,
                               (base.value - score.value) * 100, spread / math.sqrt(len(diffs)) * 100, score.n)
    return drops


def write_task_scores(scores: dict[str, TaskScore], folder: Path) -> None:
    payload = {name: {**asdict(s), "per_doc": list(s.per_doc)} for name, s in scores.items()}
    (Path(folder) / SCORES_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def load_task_scores(folder: Path) -> dict[str, TaskScore]:
    payload = json.loads((Path(folder) / SCORES_FILE).read_text())
    return {name: TaskScore(**{**s, "per_doc": tuple(s["per_doc"])}) for name, s in payload.items()}


def write_task_drops(drops: dict[str, TaskDrop], folder: Path) -> None:
    payload = {name: asdict(d) for name, d in drops.items()}
    (Path(folder) / TASKS_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def load_task_drops(folder: Path) -> dict[str, TaskDrop] | None:
    """A validate entry's task drops, or None where the recipe named no tasks."""
    path = Path(folder) / TASKS_FILE
    if not path.is_file():
        return None
    return {name: TaskDrop(**d) for name, d in json.loads(path.read_text()).items()}


def task_metrics(drops: dict[str, TaskDrop] | None) -> dict[str, float]:
    """The drops as published metrics (version tags, MLflow, `kiln diff`)."""
    return {key: value for drop in (drops or {}).values() for key, value in drop.as_metrics().items()}
