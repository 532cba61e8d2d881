"""The builtin corpus is parsed from the standard library once per user and interpreter, then read back: the same
documents in the same order, and a damaged or unwritable cache costs a parse, never a wrong or failed build."""

from __future__ import annotations

import json

from kiln.pipeline.data import corpus


def test_the_cached_corpus_is_the_parsed_one_and_a_damaged_cache_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    corpus._python_docs.cache_clear()
    try:
        parsed = corpus._python_docs()   # the one real parse (4 s): the cases below count parses instead
        cached = corpus._corpus_cache_file()
        assert cached.is_relative_to(tmp_path / "cache" / "kiln" / "corpus") and cached.is_file()
        assert len(parsed) > 1000 and all(isinstance(text, str) and len(text) >= 200 for _, text in parsed[1:50])

        parses = []
        small = (("a.py:1:f", "x" * 200), ("topic:b", "y" * 200))
        monkeypatch.setattr(corpus, "_parse_python_docs", lambda: parses.append(1) or small)
        corpus._python_docs.cache_clear()
        assert corpus._python_docs() == parsed and parses == []   # read back: same ids, texts and order
        assert 0 < len(corpus.python_docs("heldout")) < len(corpus.python_docs("train"))

        cached.write_text(json.dumps([["only", "one"]])[:-3])   # truncated JSON
        corpus._python_docs.cache_clear()
        assert corpus._python_docs() == small and parses == [1]
        assert json.loads(cached.read_text()) == [list(doc) for doc in small]   # replaced by the parse

        blocked = tmp_path / "a-file"
        blocked.write_text("")
        monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))   # no folder can be made there (even as root)
        corpus._python_docs.cache_clear()
        assert corpus._python_docs() == small and parses == [1, 1] and blocked.read_text() == ""
    finally:
        corpus._python_docs.cache_clear()
