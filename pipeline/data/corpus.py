"""Builtin text corpora that exist on every machine without a download.

`python-docs` is real English prose that ships with CPython itself: the
language reference topics (`pydoc_data.topics`) plus the longer docstrings of
the standard library. Documents are split deterministically into a training
part (calibration, demo-model training) and a held-out part (evaluation).
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

# What the builtin corpora hold: a change to their text bumps it (the stage cache's data digests and the per-user
# corpus cache both key on it).
BUILTIN_CORPUS_VERSION = 1
_SKIPPED_STDLIB_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo"}
_MIN_DOC_CHARS = 200
_HELDOUT_ONE_IN = 20


@lru_cache(maxsize=1)
def _python_docs() -> tuple[tuple[str, str], ...]:
    """(document id, text) pairs, sorted by id so the order never depends on the filesystem.

    Parsing the standard library takes seconds (4 s on 2 cores) and every build that calibrates or evaluates on
    a builtin corpus needs it, so the result is kept per user and interpreter (what its text is a function of,
    as the stage cache's data digest already assumes)."""
    cached = _corpus_cache_file()
    try:
        return tuple((doc_id, text) for doc_id, text in json.loads(cached.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        pass   # absent, unreadable or damaged: parse again and replace it
    docs = _parse_python_docs()
    try:
        from kiln.common.fsutil import atomic_write_text

        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cached, json.dumps(docs))
    except OSError:
        pass   # a read-only cache folder costs this parse again next time, nothing else
    return docs


def _corpus_cache_file() -> Path:
    """$XDG_CACHE_HOME/kiln/corpus (~/.cache/kiln/corpus), one file per interpreter and stdlib location."""
    identity = json.dumps([BUILTIN_CORPUS_VERSION, sys.version, sysconfig.get_paths()["stdlib"]]).encode()
    from kiln.common.fsutil import user_cache

    return user_cache("corpus", f"python-docs-{hashlib.sha256(identity).hexdigest()[:16]}.json")


def _parse_python_docs() -> tuple[tuple[str, str], ...]:
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
