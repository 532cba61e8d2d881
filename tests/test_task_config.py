"""Task YAMLs run no code unless the recipe asks, read nothing outside their folder, hand lm-eval only their own
files, and put every file they read into the key (issue 36.3). Each case failed on 9edec45: `!function` ran its
module inside the build, `include:` read any path, a FIFO beside the YAML or as a data file hung, a 3 GB config
was read whole, and an edited included YAML or function module left the validate stage cached."""

from __future__ import annotations

import os

import pytest
import yaml

from kiln.pipeline.plan.checks import data_problems
from kiln.pipeline.recipe.loader import load_recipe
from kiln.pipeline.data.tasks import task_key, task_requests
from tests.recipes import run_kiln, write_recipe

BASE = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "items.jsonl"}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices", "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}


def _task_folder(tmp_path, task: dict | str, name: str = "mine") -> tuple:
    folder = tmp_path / "tasks"
    folder.mkdir(exist_ok=True)
    (folder / "items.jsonl").write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n')
    path = folder / f"{name}.yaml"
    path.write_text(task if isinstance(task, str) else yaml.safe_dump(task, sort_keys=False))
    return folder, path


def _recipe(tmp_path, test_model, allow_task_code: bool = False, **task):
    evaluation = {"builtin": "python-docs-heldout", "samples": 4, "seq_len": 32, "allow_task_code": allow_task_code,
                  "tasks": [{"name": "mine", "config": "tasks/mine.yaml", **task}]}
    return write_recipe(tmp_path, str(test_model), {"fp8": {"quant": "fp8"}}, samples=4, seq_len=32,
                        evaluation=evaluation)


def _one_line(result) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    return line


FUNCTION_TASK = ("task: mine\ndataset_path: json\ndataset_kwargs: {data_files: {test: items.jsonl}}\ntest_split: test\n"
                 "output_type: multiple_choice\ndoc_to_text: !function utils.text\ndoc_to_choice: choices\n"
                 "doc_to_target: label\n")


def test_a_function_in_a_task_yaml_runs_only_when_the_recipe_allows_task_code(tmp_path, test_model):
    folder, _ = _task_folder(tmp_path, FUNCTION_TASK)
    marker = tmp_path / "imported"
    (folder / "utils.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef text(doc):\n    return doc['context']\n")
    refused = _one_line(run_kiln("check", _recipe(tmp_path, test_model)))
    assert "runs Python from its YAML (!function utils.text); kiln runs task code only when the recipe sets " \
           "evaluation.allow_task_code: true" in refused
    assert not marker.exists()   # nothing was imported to find that out
    assert run_kiln("check", _recipe(tmp_path, test_model, allow_task_code=True)).returncode == 0
    assert not marker.exists()
    # A module that is not beside the YAML (any importable one: os.system) is never run, allowed or not.
    (folder / "mine.yaml").write_text(FUNCTION_TASK.replace("utils.text", "os.system"))
    refused = _one_line(run_kiln("check", _recipe(tmp_path, test_model, allow_task_code=True)))
    assert "!function os.system names a module that is not a file beside the task YAML" in refused


def test_every_file_a_task_reads_is_in_its_key(tmp_path, test_model):
    folder, _ = _task_folder(tmp_path, FUNCTION_TASK.replace("task: mine\n", "task: mine\ninclude: common.yaml\n"))
    (folder / "common.yaml").write_text("metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\n")
    (folder / "utils.py").write_text("def text(doc):\n    return doc['context']\n")
    (folder / "helpers.py").write_text("X = 1\n")
    loaded = load_recipe(_recipe(tmp_path, test_model, allow_task_code=True))
    [request] = task_requests(loaded, lambda: [])
    assert request.files.relative() == ["mine.yaml", "common.yaml", "helpers.py", "utils.py", "items.jsonl"]
    keys = [task_key(loaded, "text")]
    for name, edit in (("common.yaml", "# edited\n"), ("utils.py", "# edited\n"), ("helpers.py", "Y = 2\n"),
                       ("items.jsonl", '{"context": "z", "choices": ["b", "c"], "label": 1}\n')):
        with open(folder / name, "a") as handle:
            handle.write(edit)
        keys.append(task_key(loaded, "text"))
        assert keys[-1] != keys[-2], f"editing {name} left the key as it was"
    # lm-eval is handed a copy of exactly these files: nothing else of the folder.
    (folder / "other.yaml").write_text("task: other\n")
    os.mkfifo(folder / "pipe.yaml")
    staged = request.files.stage(tmp_path / "staged")
    assert sorted(p.name for p in staged.parent.iterdir()) == sorted(request.files.relative())


@pytest.mark.parametrize("layout, expected", [
    ("include-outside", "is outside the task YAML's folder"),
    ("include-missing", "reads '{folder}/nowhere.yaml', which does not exist"),
    ("data-fifo", "reads '{folder}/items.jsonl', which is not a regular file"),
    ("config-fifo", "'{folder}/mine.yaml' is not a regular file"),
    ("data-huge", "reads '{folder}/items.jsonl', which has 3221225472 bytes, more than kiln reads for a task (256 MiB)"),
    ("config-huge", "'{folder}/mine.yaml' has 3221225472 bytes, more than kiln reads for a task (1 MiB)"),
    ("yaml-bomb", "is not valid YAML (line 3: uses the YAML alias *a, which kiln does not expand in task configs"),
    ("link-out", "reads '{folder}/items.jsonl', which is outside the task YAML's folder"),
])
def test_task_files_that_cannot_be_read_safely_are_refused_in_one_line(tmp_path, test_model, layout, expected):
    folder, path = _task_folder(tmp_path, {"task": "mine", **BASE})
    if layout.startswith("include"):
        (tmp_path / "secret.yaml").write_text("doc_to_text: context\n")
        target = "../secret.yaml" if layout == "include-outside" else "nowhere.yaml"
        path.write_text(yaml.safe_dump({"task": "mine", "include": target, **BASE}))
    elif layout == "data-fifo":
        (folder / "items.jsonl").unlink()
        os.mkfifo(folder / "items.jsonl")
    elif layout == "config-fifo":
        path.unlink()
        os.mkfifo(path)
    elif layout.endswith("huge"):   # sparse: 3 GB that is never read
        with open(folder / "items.jsonl" if layout == "data-huge" else path, "r+b") as handle:
            handle.truncate(3 << 30)
    elif layout == "yaml-bomb":
        path.write_text("task: mine\na: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n")
    elif layout == "link-out":
        (folder / "items.jsonl").unlink()
        (folder / "items.jsonl").symlink_to(tmp_path / "secret.jsonl")
        (tmp_path / "secret.jsonl").write_text("{}\n")
    # What `kiln check` runs (its CLI is tested above): in this process, one problem per recipe.
    [line] = data_problems(load_recipe(_recipe(tmp_path, test_model)))
    assert expected.format(folder=folder) in line, line


def test_max_new_tokens_past_the_models_context_is_one_line(tmp_path, test_model):
    _task_folder(tmp_path, {"task": "mine", **BASE})
    line = _one_line(run_kiln("check", _recipe(tmp_path, test_model, max_new_tokens=100000)))
    assert "evaluation.tasks[0].max_new_tokens: 100000 does not leave room for a prompt in the model's context of" in line
