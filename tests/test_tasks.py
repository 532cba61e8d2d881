"""Task-level evaluation through lm-evaluation-harness (issue 25.3-4): kiln's reference runtime as an lm-eval
model scores like lm-eval's own `hf` model on the baseline, HumanEval's code runs only with the recipe's opt-in
and inside the sandbox, and a task gate fails a build with the task's name and its drop."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml

from kiln.pipeline.data.corpus import python_docs
from kiln.validate import TaskDrop, ValidateRequest, evaluate_gates
from kiln.validate.builtin_tasks import (
    humaneval_config, humaneval_problems, humaneval_program, next_line_config, next_line_items,
)
from kiln.validate.records import Metrics
from kiln.validate.sandbox import run_program
from kiln.validate.tasks import TaskRequest, TaskScore, compare_tasks, run_tasks
from tests.conftest import SPINE_VARIANTS, run_kiln, seed_home, write_recipe

METRICS = Metrics(tokens=1, baseline_ppl=1, quantized_ppl=1, ppl_increase_pct=0, mean_kl=0, top1_agreement=1)


def _evaluate(model, config: dict, limit: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, tasks=[config], task_manager=TaskManager(include_defaults=False),
                                   limit=limit, log_samples=True, bootstrap_iters=0)


def _loglikelihoods(out: dict, task: str) -> list[float]:
    docs = sorted(out["samples"][task], key=lambda d: d["doc_id"])
    return [float(resp[0][0]) for doc in docs for resp in doc["resps"]]


def _spine_checkpoint(cache: Path, quant: str) -> Path:
    for record in sorted((cache / "quantize").glob("*/kiln.json")):
        if json.loads(record.read_text())["quant"] == quant:
            return record.parent / "hf"
    raise AssertionError(f"no {quant} checkpoint in the spine cache")


@pytest.mark.slow
def test_kiln_lm_scores_like_lm_eval_hf_on_the_baseline_and_runs_the_exported_checkpoint(test_model, spine_cache):
    from lm_eval.models.huggingface import HFLM

    from kiln.validate.lm_eval_model import KilnLM

    config = next_line_config(next_line_items(python_docs("heldout")))
    kiln = _evaluate(KilnLM(str(test_model), baseline=True), config, limit=40)
    hf = _evaluate(HFLM(pretrained=str(test_model), dtype="float32", device="cpu", batch_size=1), config, limit=40)
    mine, theirs = _loglikelihoods(kiln, "next-line"), _loglikelihoods(hf, "next-line")
    assert len(mine) == len(theirs) == 160   # 40 items x 4 choices
    assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(mine, theirs)), max(
        abs(a - b) / abs(b) for a, b in zip(mine, theirs))
    assert kiln["results"]["next-line"]["acc,none"] == hf["results"]["next-line"]["acc,none"]

    # The same task on the exported FP8 checkpoint, decoded as kiln validates it: close to the baseline, not equal.
    fp8 = _evaluate(KilnLM(str(_spine_checkpoint(spine_cache, "fp8"))), config, limit=40)
    quantized = _loglikelihoods(fp8, "next-line")
    assert quantized != mine
    assert max(abs(a - b) / abs(b) for a, b in zip(quantized, mine)) < 0.2


def test_humaneval_ships_its_problems_and_a_wrong_completion_fails():
    problems = humaneval_problems()
    assert len(problems) == 164
    for problem in problems[:5]:
        assert run_program(humaneval_program(problem, problem["canonical_solution"])).passed
        assert not run_program(humaneval_program(problem, "    return None\n")).passed


@pytest.mark.slow
def test_humaneval_runs_only_with_the_recipe_opt_in(tmp_path, test_model, kiln_home):
    variants = {"fp8": {"quant": "fp8"}}
    recipe = write_recipe(tmp_path, str(test_model), variants, evaluation={
        "builtin": "python-docs-heldout", "samples": 4, "seq_len": 64, "tasks": [{"name": "humaneval"}]})
    checked = run_kiln("check", recipe)
    assert checked.returncode == 2
    assert "allow_code_execution: true" in checked.stderr and "Traceback" not in checked.stderr
    assert len(checked.stderr.strip().splitlines()) == 1

    request = TaskRequest("humaneval", humaneval_config(humaneval_problems(), max_new_tokens=32), "pass_at_1",
                          limit=2, unsafe_code=True, max_new_tokens=32)
    with pytest.raises(PermissionError, match="allow_code_execution"):
        run_tasks(test_model, [request], ValidateRequest(allow_code_execution=False), baseline=True)
    scores = run_tasks(test_model, [request], ValidateRequest(allow_code_execution=True), baseline=True)
    assert scores["humaneval"].n == 2 and set(scores["humaneval"].per_doc) <= {0.0, 1.0}


def test_next_line_items_are_real_lines_with_one_true_continuation():
    documents = python_docs("heldout")
    items = next_line_items(documents)
    assert items == next_line_items(documents) and len(items) > 500   # deterministic, and enough for a score
    texts = "\n".join(documents)
    for item in items[:50]:
        assert len(set(item["choices"])) == 4 and 0 <= item["label"] < 4
        assert item["context"] + item["choices"][item["label"]] in texts   # the true line follows its context
        answer = len(item["choices"][item["label"]])
        assert all(0.75 <= len(choice) / answer <= 1.33 for choice in item["choices"])


def test_a_task_gate_must_name_a_listed_task(tmp_path, test_model, kiln_home):
    variants = {"fp8": {"quant": "fp8", "gates": {"max_task_drop": {"hellaswag": 1.0}}}}
    recipe = write_recipe(tmp_path, str(test_model), variants, evaluation={
        "builtin": "python-docs-heldout", "samples": 4, "seq_len": 64, "tasks": [{"name": "next-line"}]})
    checked = run_kiln("check", recipe)
    assert checked.returncode == 2 and "Traceback" not in checked.stderr
    assert "max_task_drop names hellaswag, which evaluation.tasks does not list (it lists next-line)" in checked.stderr


def test_a_task_gate_passes_only_a_drop_its_documents_bound():
    def drop(points, se, n=100, value=None):
        return TaskDrop("t", "acc", 0.5, 0.5 - points / 100 if value is None else value, 0.05, points, se, n)

    failed = evaluate_gates(METRICS, max_task_drop={"t": 1.0}, tasks={"t": drop(3.0, 1.0)})
    assert not failed.passed and failed.failures[0].startswith("max_task_drop.t: t acc") and "over by 2.00" in \
        failed.failures[0]
    # A drop inside its standard error but an error bar wider than the bound: undecided, so it fails.
    noisy = evaluate_gates(METRICS, max_task_drop={"t": 1.0}, tasks={"t": drop(0.5, 4.0)})
    assert not noisy.passed and "100 documents are too few to bound the drop at 1 (it may be up to 4.50" in \
        noisy.failures[0]
    assert not evaluate_gates(METRICS, max_task_drop={"t": 1.0}, tasks={"t": drop(3.0, 4.0)}).passed
    # Within noise and the whole error bar under the bound: a pass, and the noise is reported.
    quiet = evaluate_gates(METRICS, max_task_drop={"t": 5.0}, tasks={"t": drop(1.0, 2.0)})
    assert quiet.passed and "within its standard error" in quiet.within_noise[0]
    assert evaluate_gates(METRICS, max_task_drop={"t": 5.0}, tasks={"t": drop(3.0, 1.0)}).as_dict() == {
        "passed": True, "failures": []}
    # One document: a 100-point drop had an infinite standard error and passed as "within noise" (issue 36.1).
    one = compare_tasks({"t": TaskScore("t", "acc", 1.0, 0.0, (1.0,))}, {"t": TaskScore("t", "acc", 0.0, 0.0, (0.0,))})
    gate = evaluate_gates(METRICS, max_task_drop={"t": 5.0}, tasks=one)
    assert not gate.passed and "scored on 1 document(s), and a standard error needs at least 2" in gate.failures[0]
    # A score that is not a number fails whatever the bound.
    nan = evaluate_gates(METRICS, max_task_drop={"t": 100.0}, tasks={"t": drop(math.nan, 1.0, value=math.nan)})
    assert not nan.passed and "not finite, so the gate cannot pass" in nan.failures[0]


@pytest.mark.parametrize("field", ["ppl_increase_pct", "mean_kl", "top1_agreement", "baseline_ppl"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_metric_that_is_not_finite_fails_every_gate(field, bad):
    """NaN compared with > and < is always False: a NaN KL passed max_kl on 9edec45. Gated or not, it fails."""
    import dataclasses

    metrics = dataclasses.replace(METRICS, **{field: bad})
    for gates in ({"max_kl": 1.0, "max_ppl_increase_pct": 5.0, "min_top1_agreement": 0.5}, {}):
        result = evaluate_gates(metrics, **gates)
        if field == "baseline_ppl":   # not gated itself: what it breaks (the increase) is what fails
            metrics = dataclasses.replace(metrics, ppl_increase_pct=bad)
            result = evaluate_gates(metrics, **gates)
        assert not result.passed and len(result.failures) == 1
        assert "could not be measured, so no gate can pass" in result.failures[0]


    # Where no task was scored (an engine's gate), the task bounds do not apply.
    assert evaluate_gates(METRICS, max_task_drop={"t": 0.0}).passed


def _fragile_task(folder: Path, model: Path) -> Path:
    """An lm-eval task YAML over local data: next-line items whose answer is the baseline's own choice, kept where
    the baseline's margin between its two best choices is smallest, so quantization can only lose points."""
    from kiln.validate.lm_eval_model import KilnLM

    items = next_line_items(python_docs("heldout"))[:400]
    out = _evaluate(KilnLM(str(model), baseline=True), next_line_config(items), limit=len(items))
    scored = []
    for doc in sorted(out["samples"]["next-line"], key=lambda d: d["doc_id"]):
        lls = sorted(((float(r[0][0]), i) for i, r in enumerate(doc["resps"])), reverse=True)
        scored.append((lls[0][0] - lls[1][0], {**items[doc["doc_id"]], "label": lls[0][1]}))
    fragile = [item for _, item in sorted(scored, key=lambda pair: pair[0])[:60]]
    (folder / "fragile.jsonl").write_text("".join(json.dumps(item) + "\n" for item in fragile))
    task = {"task": "fragile-next-line", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": "fragile.jsonl"}}, "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
            "doc_to_target": "label", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    path = folder / "fragile.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    return path


@pytest.mark.slow
def test_a_task_gate_fails_a_build_with_the_task_name_and_the_drop(tmp_path, test_model, kiln_home, spine_cache):
    seed_home(kiln_home, spine_cache)
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    _fragile_task(tasks_dir, test_model)
    os.mkfifo(tasks_dir / "nobody-reads.yaml")   # lm-eval opened every YAML of the folder: this hung 9edec45's build
    evaluation = {"builtin": "python-docs-heldout", "samples": 16, "seq_len": 128}
    before = run_kiln("build", write_recipe(tmp_path, str(test_model), {"fp8": SPINE_VARIANTS["fp8"]}, name="spine",
                                            evaluation=evaluation), "--json")
    assert before.returncode == 0, before.stderr
    variants = {"fp8": SPINE_VARIANTS["fp8"],
                "int4-awq": {**SPINE_VARIANTS["int4-awq"], "gates": {"max_task_drop": {"fragile-next-line": 0.0}}}}
    recipe = write_recipe(tmp_path, str(test_model), variants, name="spine", evaluation={
        **evaluation, "tasks": [{"name": "fragile-next-line", "config": "tasks/fragile.yaml"}]})
    built = run_kiln("build", recipe, "--json")
    assert built.returncode == 3, built.stderr
    document = json.loads(built.stdout)
    by_name = {v["variant"]: v for v in document["variants"]}
    int4 = by_name["int4-awq"]
    drop = int4["tasks"]["fragile-next-line"]
    assert drop["baseline"] == 1.0 and drop["n"] == 60 and drop["drop_points"] > drop["drop_stderr_points"] > 0
    assert not int4["gate"]["passed"] and int4["registry"] is None
    failure = int4["gate"]["failures"][0]
    assert failure.startswith("max_task_drop.fragile-next-line: fragile-next-line acc")
    assert f"drop {drop['drop_points']:+.2f}" in failure
    assert {r.split(":")[0] for r in document["ran"] if r.endswith(":int4-awq")} == {"validate"}   # quantize cached

    # The variant without a task gate is published again, now with its task scores as metrics and tasks.json.
    fp8 = by_name["fp8"]
    assert fp8["gate"]["passed"] and fp8["registry"]["version"] == "2"
    shown = run_kiln("diff", fp8["registry"]["name"], "1", "2", "--json")
    assert shown.returncode == 0, shown.stderr
    changed = json.loads(shown.stdout)
    first, second, _ = changed["metrics"]["checkpoint.task.fragile-next-line.acc"]
    assert first is None and second == pytest.approx(fp8["tasks"]["fragile-next-line"]["value"])
    assert "tasks.json" in changed["files"]
