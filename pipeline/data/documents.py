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
from typing import Iterable, Iterator

from kiln.common.digest import canonical_digest, file_sha256
from kiln.common.errors import UserInputError
from kiln.pipeline.data.corpus import BUILTIN_CORPUS_VERSION
from kiln.pipeline.recipe.schema import DataSpec


@dataclass(frozen=True)
class ResolvedData:
    spec: DataSpec
    file: Path | None
    digest: str

    def key_config(self) -> dict:
        """What about this data changes results: the digest and how it is cut into samples."""
        return {"digest": self.digest, "samples": self.spec.samples, "seq_len": self.spec.seq_len}

    def documents(self) -> Iterator[str]:
        """The documents in order, read lazily: token_samples stops as soon as it has samples x seq_len
        tokens, and a file is never read past a budget of text for that many tokens."""
        if self.spec.builtin:
            from kiln.pipeline.data.corpus import BUILTIN_CORPORA

            return iter(BUILTIN_CORPORA[self.spec.builtin]())
        budget = max(_MIN_READ_CHARS, self.spec.samples * self.spec.seq_len * _CHARS_PER_TOKEN_BUDGET)
        return _read_documents(self.file, self.spec.text_field, Path(self.spec.file).suffix == ".txt", budget)


def resolve_data(spec: DataSpec, resolve_path, field: str) -> ResolvedData:
    """`resolve_path` turns a recipe-relative path into an absolute one; `field` names it in errors."""
    if spec.builtin:
        identity = {"builtin": spec.builtin, "version": BUILTIN_CORPUS_VERSION, "python": sys.version}
        return ResolvedData(spec, None, canonical_digest(identity))
    path = resolve_path(spec.file)
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise UserInputError(f"{field}.file: '{path}' {what} (fix: point it at a .txt or .jsonl file)")
    return ResolvedData(spec, path, file_sha256(path))


# Text averages about 4 characters per token; JSON keys, markup and short documents add more. A file is
# read no further than this many characters per token the recipe needs (and at least 16 Mi characters).
_CHARS_PER_TOKEN_BUDGET = 64
_MIN_READ_CHARS = 16 * 2**20
_CHUNK_CHARS = 2**20


def _read_documents(path: Path, text_field: str, plain_text: bool, budget: int) -> Iterator[str]:
    """.txt: blank-line separated paragraphs; otherwise JSONL records' `text_field`. The format follows the
    name the recipe gives, not where a link points."""
    found = False
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            records = _paragraphs(handle, budget) if plain_text else _json_lines(handle, budget)
            for number, text in records:
                if plain_text:
                    found = True
                    yield text
                    continue
                document = _json_text(path, number, text, text_field)
                if document is not None:
                    found = True
                    yield document
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{path}: not UTF-8 text (byte {exc.start} of a chunk: {exc.reason}) "
                             "(fix: convert it, e.g. iconv -t UTF-8)") from None
    except _TooLong as exc:
        raise UserInputError(f"{path}: {exc} (fix: split the text into documents, or use a smaller file)") from None
    if not found:
        raise UserInputError(f"{path}: no text found (fix: add documents)")


class _TooLong(Exception):
    pass


def _paragraphs(handle, budget: int) -> Iterator[tuple[int, str]]:
    pending, read, found = "", 0, False
    while read < budget:
        chunk = handle.read(min(_CHUNK_CHARS, budget - read))
        if not chunk:   # the file ended within the budget: its last paragraph counts too
            if pending.strip():
                yield 0, pending.strip()
            return
        read += len(chunk)
        parts = (pending + chunk).replace("\r\n", "\n").split("\n\n")
        pending = parts.pop()
        for part in parts:
            if part.strip():
                found = True
                yield 0, part.strip()
    if not found:
        raise _TooLong(f"no blank line between paragraphs in the first {read} characters kiln reads")


def _json_lines(handle, budget: int) -> Iterator[tuple[int, str]]:
    read, number = 0, 0
    while read < budget:
        line = handle.readline(budget - read)
        if not line:
            return
        number += 1
        read += len(line)
        if not line.endswith("\n") and read >= budget:   # cut by the budget, not by the file's end
            if number == 1:
                raise _TooLong(f"line 1 is longer than the {budget} characters kiln reads")
            return
        yield number, line


def _json_text(path: Path, number: int, line: str, text_field: str) -> str | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}:{number}: not valid JSON: {exc.msg} (fix: one JSON object per line)") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise UserInputError(
            f"{path}:{number}: no string field '{text_field}' (fix: add it, or set text_field in the recipe)"
        )
    return record[text_field]


def token_samples(documents: Iterable[str], tokenizer, samples: int, seq_len: int):
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
