"""The structure checks of the files beside the weights (kiln.validate.structure): config.json, the generation
config, the tokenizer and its chat template, against the source's. A served model that answers in the wrong format
(another chat template, a lost stop token) passes every logit metric."""

from __future__ import annotations

import json
from pathlib import Path

from kiln.validate.structure.records import IGNORED_CONFIG_KEYS, PROBE_TEXT, StructureExpectation

GENERATION_CONFIG = "generation_config.json"
DTYPE_KEYS = ("dtype", "torch_dtype")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_files(hf_dir: Path, source_dir: Path,
                expected: StructureExpectation) -> tuple[int, list[str], list[str]]:
    """(files checked, problems, differences the recipe allows: listed, not refused)."""
    problems, allowed, count = [], [], 0
    for kind, check in (("config", _config), ("generation_config", _generation_config), ("tokenizer", _tokenizer)):
        checked, found = check(hf_dir, source_dir, expected)
        count += checked
        for problem in found:
            what = "chat_template" if "chat template" in problem else kind
            (allowed if what in expected.allowed_differences else problems).append(problem)
    return count, problems, allowed


def _short_value(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(exported: dict, source: dict, ignored: tuple[str, ...] = ()) -> list[str]:
    keys = sorted((set(exported) | set(source)) - set(ignored))
    return [key for key in keys if exported.get(key) != source.get(key)]


def _config(hf_dir: Path, source_dir: Path, expected: StructureExpectation) -> tuple[int, list[str]]:
    exported = json.loads((hf_dir / "config.json").read_text())
    source = json.loads((source_dir / "config.json").read_text())
    if expected.dtype:   # a recipe may load the model in another dtype than stored: the export says that one
        source.update({key: expected.dtype for key in DTYPE_KEYS if key in source})
    return 1, [f"hf/config.json: {key} is {_short_value(exported.get(key))}, the source's is "
               f"{_short_value(source.get(key))}" for key in _differences(exported, source, IGNORED_CONFIG_KEYS)]


def _generation_config(hf_dir: Path, source_dir: Path, expected: StructureExpectation) -> tuple[int, list[str]]:
    source_path, exported_path = source_dir / GENERATION_CONFIG, hf_dir / GENERATION_CONFIG
    if not source_path.exists():
        return 0, []   # the export may derive one from config.json (`_from_model_config`): nothing to compare
    if not exported_path.exists():
        return 1, [f"hf/{GENERATION_CONFIG}: missing; the source has one (its stop tokens and sampling defaults)"]
    exported, source = json.loads(exported_path.read_text()), json.loads(source_path.read_text())
    return 1, [f"hf/{GENERATION_CONFIG}: {key} is {_short_value(exported.get(key))}, the source's is "
               f"{_short_value(source.get(key))}" for key in _differences(exported, source, ("transformers_version",))]


def _tokenizer(hf_dir: Path, source_dir: Path, expected: StructureExpectation) -> tuple[int, list[str]]:
    if not any((source_dir / name).exists() for name in TOKENIZER_FILES):
        return 0, []
    if not any((hf_dir / name).exists() for name in TOKENIZER_FILES):
        return 1, ["hf/: no tokenizer files, though the source has them (a server could not encode a prompt)"]
    from transformers import AutoTokenizer

    from kiln.common.progress import quiet_libraries

    with quiet_libraries():
        source = AutoTokenizer.from_pretrained(source_dir, trust_remote_code=expected.trust_remote_code)
        try:
            exported = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=expected.trust_remote_code)
        except Exception as exc:   # whatever a damaged file raises: a server could not load it either
            said = str(exc).splitlines()[0][:120] if str(exc) else ""
            return 1, [f"hf/ tokenizer: it does not load ({type(exc).__name__}: {said})"]
    problems = []
    if exported.get_vocab() != source.get_vocab():
        changed = set(exported.get_vocab().items()) ^ set(source.get_vocab().items())
        problems.append(f"hf/ tokenizer: its vocabulary differs from the source's in {len(changed)} entries")
    for what in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if getattr(exported, what, None) != getattr(source, what, None):
            problems.append(f"hf/ tokenizer: {what} is {getattr(exported, what, None)!r}, the source's is "
                            f"{getattr(source, what, None)!r}")
    if sorted(exported.all_special_tokens) != sorted(source.all_special_tokens):
        problems.append(f"hf/ tokenizer: special tokens {sorted(exported.all_special_tokens)}, the source's are "
                        f"{sorted(source.all_special_tokens)}")
    if getattr(exported, "chat_template", None) != getattr(source, "chat_template", None):
        problems.append("hf/ tokenizer: its chat template differs from the source's" if source.chat_template else
                        "hf/ tokenizer: it has a chat template the source does not")
        if source.chat_template and not exported.chat_template:
            problems[-1] = "hf/ tokenizer: the chat template is missing (chat requests would be formatted differently)"
    if not problems and exported(PROBE_TEXT)["input_ids"] != source(PROBE_TEXT)["input_ids"]:
        problems.append("hf/ tokenizer: it encodes a probe text differently from the source's")
    return 1, problems
