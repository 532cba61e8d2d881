"""Calibration and evaluation text: resolve a recipe's DataSpec to documents.

Digests are cheap so that planning stays fast: a builtin corpus is identified
by its name, its version and the interpreter that ships its text; a file by
its bytes.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from kiln.pipeline.digest import canonical_digest, file_sha256
from kiln.pipeline.errors import UserInputError
from kiln.pipeline.recipe import DataSpec

_BUILTIN_CORPUS_VERSION = 1


@dataclass(frozen=True)
class ResolvedData:
    spec: DataSpec
    file: Path | None
    digest: str

    def key_config(self) -> dict:
        """What about this data changes results: the digest and how it is cut into samples."""
        return {"digest": self.digest, "samples": self.spec.samples, "seq_len": self.spec.seq_len}

    def documents(self) -> list[str]:
        if self.spec.builtin:
            from kiln.pipeline.corpus import BUILTIN_CORPORA

            return BUILTIN_CORPORA[self.spec.builtin]()
        return _read_documents(self.file, self.spec.text_field)


def resolve_data(spec: DataSpec, resolve_path, field: str) -> ResolvedData:
    """`resolve_path` turns a recipe-relative path into an absolute one; `field` names it in errors."""
    if spec.builtin:
        identity = {"builtin": spec.builtin, "version": _BUILTIN_CORPUS_VERSION, "python": sys.version}
        return ResolvedData(spec, None, canonical_digest(identity))
    path = resolve_path(spec.file)
    if not path.is_file():
        raise UserInputError(f"{field}.file: '{path}' does not exist (fix: point it at a .txt or .jsonl file)")
    return ResolvedData(spec, path, file_sha256(path))


def _read_documents(path: Path, text_field: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        docs = [part.strip() for part in text.split("\n\n") if part.strip()]
    else:
        docs = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserInputError(f"{path}:{number}: not valid JSON: {exc.msg} (fix: one JSON object per line)") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise UserInputError(
                    f"{path}:{number}: no string field '{text_field}' (fix: add it, or set text_field in the recipe)"
                )
            docs.append(record[text_field])
    if not docs:
        raise UserInputError(f"{path}: no text found (fix: add documents)")
    return docs


def token_samples(documents: list[str], tokenizer, samples: int, seq_len: int):
    """Cut the documents' token stream into `samples` windows of `seq_len` tokens (a [n, seq_len] tensor).

    Documents are joined with the EOS token, as in training. Too little text is
    an input error: silently evaluating on fewer tokens would make metrics lie.
    """
    import torch

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    need = samples * seq_len
    for doc in documents:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise UserInputError(
            f"the text gives {len(ids)} tokens but samples x seq_len needs {need} "
            f"(fix: lower samples or seq_len, or add text)"
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(samples, seq_len)
