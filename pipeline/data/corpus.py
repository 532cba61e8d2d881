"""Builtin text corpora that exist on every machine without a download.

`python-docs` is real English prose that ships with CPython itself: the
language reference topics (`pydoc_data.topics`) plus the longer docstrings of
the standard library. Documents are split deterministically into a training
part (calibration, demo-model training) and a held-out part (evaluation).
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from functools import lru_cache
from pathlib import Path

_SKIPPED_STDLIB_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo"}
_MIN_DOC_CHARS = 200
_HELDOUT_ONE_IN = 20


@lru_cache(maxsize=1)
def _python_docs() -> tuple[tuple[str, str], ...]:
    """(document id, text) pairs, sorted by id so the order never depends on the filesystem."""
    import pydoc_data.topics

    docs = [(f"topic:{name}", text) for name, text in pydoc_data.topics.topics.items()]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if _SKIPPED_STDLIB_DIRS.intersection(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= _MIN_DOC_CHARS:
                    name = getattr(node, "name", "<module>")
                    docs.append((f"{rel.as_posix()}:{getattr(node, 'lineno', 0)}:{name}", doc))
    docs.sort(key=lambda item: item[0])
    return tuple(docs)


def _is_heldout(doc_id: str) -> bool:
    return int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % _HELDOUT_ONE_IN == 0


def python_docs(split: str) -> list[str]:
    """Documents of the `train` or `heldout` split."""
    want_heldout = split == "heldout"
    return [text for doc_id, text in _python_docs() if _is_heldout(doc_id) == want_heldout]


BUILTIN_CORPORA = {
    "python-docs-train": lambda: python_docs("train"),
    "python-docs-heldout": lambda: python_docs("heldout"),
}
