"""The test model is deterministic and cached by the digest of everything that shapes it."""

from __future__ import annotations

import json
from dataclasses import replace

from kiln.common.digest import file_sha256
from tests.testmodel import TestModelSpec, ensure_test_model, spec_digest, training_environment

TINY = replace(TestModelSpec(), steps=3, vocab_size=512)


def test_training_is_deterministic_and_cached(tmp_path):
    first = ensure_test_model(tmp_path / "a", TINY, log=lambda _: None)
    second = ensure_test_model(tmp_path / "b", TINY, log=lambda _: None)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert file_sha256(first / name) == file_sha256(second / name), name
    mtime = (first / "model.safetensors").stat().st_mtime
    assert ensure_test_model(tmp_path / "a", TINY, log=lambda _: None) == first
    assert (first / "model.safetensors").stat().st_mtime == mtime  # not retrained
    config = json.loads((first / "config.json").read_text())
    assert config["hidden_size"] % 128 == 0 and config["intermediate_size"] % 128 == 0
    assert config["rope_parameters"]["rope_type"] == "llama3"


def test_spec_and_environment_changes_change_the_cache_folder():
    assert spec_digest(TINY) != spec_digest(replace(TINY, seed=1))
    here = training_environment()
    assert spec_digest(TINY) == spec_digest(TINY, environment=here)
    other_cpu = "AVX512" if here["cpu"] == "AVX2" else "AVX2"   # whichever this host is not
    for field, other in (("torch", "2.14.1"), ("tokenizers", "0.1.0"), ("transformers", "4.57.3"), ("cpu", other_cpu),
                         ("python", "3.12.0")):
        assert spec_digest(TINY, environment={**here, field: other}) != spec_digest(TINY), field
